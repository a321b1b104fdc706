// Package bench measures the device transports side by side with their
// peers on loopback: Bastion's MQTT over TLS against Mosquitto 2 with
// require_certificate, Bastion's CoAP over DTLS (PSK) against libcoap's
// coap-server-openssl, and the gateway's RSS with many idle devices. It
// holds benchmarks (see README.md for the command), which are not part of
// CI's pass/fail, and one unit test of the load generator's MQTT client
// (TestPacketConnOneWritePerPacket).
package bench
