// Package bench measures the device transports side by side with their
// peers on loopback: Bastion's MQTT over TLS against Mosquitto 2 with
// require_certificate, Bastion's CoAP over DTLS (PSK) against libcoap's
// coap-server-openssl, and the gateway's RSS with many idle devices. It
// holds only benchmarks (see README.md for the command); nothing here runs
// in CI's pass/fail.
package bench
