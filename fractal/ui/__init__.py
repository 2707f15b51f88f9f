"""The live fleet page the admin app serves at ``/ui/`` (static HTML, CSS and vanilla JS from package data)."""
