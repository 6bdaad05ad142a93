"""Upstream side: connection pools per upstream (HTTP/1.1 now; HTTP/2 fills the same seam)."""
