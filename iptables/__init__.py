"""Traffic capture: iptables redirect rule sets and network-namespace helpers."""
