"""HTTP mode: sessions, exchanges, upstream pools, routing, access log."""
