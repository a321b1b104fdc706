// Package firewall compiles the gateway's declarative network policy into
// iptables and ip6tables rules and keeps the kernel in step with it.
package firewall
