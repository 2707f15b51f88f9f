"""Protocol logs uploaded by hosts and clients, kept in S3 for debugging."""
