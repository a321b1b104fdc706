package bench

import (
	"context"
	"os"

	"github.com/bastion-iot/bastion/internal/devicesim"
)

// publisher is the load generator's MQTT client.
type publisher interface {
	Publish(ctx context.Context, topic string, qos byte, payload []byte) (byte, error)
	Close() error
}

// packetWrites reports whether the benchmark's MQTT clients write each
// packet in one TLS record (BENCH_MQTT_WRITES=packet) instead of devicesim's
// paho client, which writes a PUBLISH in three Write calls (fixed header,
// topic and properties, payload): three TLS records and three write(2)s per
// message.
//
// Why it matters: with one publisher at QoS 0 on an otherwise idle machine
// the client, not the broker, sets the pace. A broker that keeps up with the
// client leaves the TCP window open, so every one of the client's writes is
// sent as its own segment and crosses both TCP stacks on the client's CPU;
// a broker that lags (Mosquitto, CPU-bound at about 3.7 µs a message) keeps
// the window full, and the client's writes pile up into a few large
// segments that the broker's reads pull through (0.01 segments per message
// against 1–2). The benchmark prints TCP segments and the client's CPU per
// message for both brokers so that this shows. Most MQTT clients (paho.mqtt.c,
// mosquitto_pub, embedded stacks) write a packet with one send; the
// qos0/pubs1/mosquitto_pub run has Mosquitto's own client as the load
// generator for that case (mosquittoPubLoad).
func packetWrites() bool { return os.Getenv("BENCH_MQTT_WRITES") == "packet" }

// dialPublisher connects d to the broker at addr with the writes
// packetWrites chooses (devicesim's Device.PacketWrites).
func dialPublisher(ctx context.Context, d *devicesim.Device, addr string) (publisher, error) {
	dd := *d
	dd.PacketWrites = packetWrites()
	return dd.DialMQTT(ctx, addr, nil)
}
