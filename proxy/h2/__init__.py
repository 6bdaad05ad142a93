"""What both sides of HTTP/2 share (the client-facing front and the upstream pool), below both."""
