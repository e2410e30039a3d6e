"""prefcache.model."""
