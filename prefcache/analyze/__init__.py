"""prefcache.analyze."""
