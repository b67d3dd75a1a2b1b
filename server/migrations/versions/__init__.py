"""The store's schema revisions, oldest first (0001 is the previous release's schema)."""
