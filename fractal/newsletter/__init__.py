"""The newsletter: double opt-in subscriptions with signed, expiring links."""
