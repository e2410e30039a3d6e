"""prefcache.core."""
