"""The client-facing side: the HTTP/1.1 and HTTP/2 fronts, TLS, and the request driver both call."""
