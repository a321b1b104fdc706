// Package pki is the gateway's own certificate authority: root and issuing
// keys, server certificates for every listener, device certificates and
// PSKs, revocation and renewal, and the one place where TLS and DTLS
// settings are chosen. Private keys never leave the state directory and are
// never logged.
package pki
