"""L7 policy enforcement: the transparent redirect contract (`redirect`), the proxy's view of the
policies (`policy`), the HTTP/1.1 parser and rules (`http`), the proxy itself (`proxy`) and its
Hubble L7 flows (`flows`)."""
