// Package gateway composes Bastion: configuration, store, PKI, transports,
// upstream, firewall, firmware cache, pairing and console, with one
// lifetime and one shutdown.
package gateway
