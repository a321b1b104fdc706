// Command devicesim is a simulated constrained device for demos, tests and
// load: it publishes telemetry and receives commands over CoAP/DTLS or
// MQTT/TLS with the credentials `bastionctl --json device add` prints.
// Everything but flag parsing is in internal/devicesim.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/internal/devicesim"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

const usage = `usage:
  devicesim --coap|--mqtt --creds FILE [--key FILE] [--ca FILE] [--addr HOST:PORT]
            [--qos 0|1] [--count N --rate R] publish TOPIC PAYLOAD
  devicesim --mqtt --creds FILE ... subscribe [PATH]    (commands on devices/{id}/c/PATH, default #)
  devicesim --coap --creds FILE ... observe [PATH]      (commands on /c/PATH)
  devicesim --coap|--mqtt --creds FILE ... firmware fetch --out FILE [--vendor-key PEM]   (see firmware -h)
  devicesim keygen KEY_OUT CSR_OUT                      (key and CSR for bastionctl device add --auth cert --csr)
  devicesim pair ... | press-button ...                 (pairing: see devicesim pair --help)

TOPIC is a telemetry path (temp, room/temp) or a full topic devices/{id}/t/... .
publish exits 1 unless the gateway acknowledged all N messages (none refused,
none left unsent when --limit ran out).
`

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "pair" {
		return runPair(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "press-button" {
		return runPress(args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("devicesim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	var (
		useCoAP = fs.Bool("coap", false, "speak CoAP over DTLS")
		useMQTT = fs.Bool("mqtt", false, "speak MQTT 5 over TLS")
		creds   = fs.String("creds", "", "credentials JSON from bastionctl --json device add")
		keyFile = fs.String("key", "", "device private key PEM (certificate devices)")
		caFile  = fs.String("ca", "", "gateway root CA PEM (default: ca_pem from the credentials)")
		addr    = fs.String("addr", "", "gateway address (default 127.0.0.1 and the port for the transport)")
		qos     = fs.Int("qos", 1, "MQTT QoS (0 or 1); CoAP: 1 = confirmable, 0 = non-confirmable")
		count   = fs.Int("count", 1, "messages to publish")
		rate    = fs.Float64("rate", 0, "messages per second (0: as fast as acknowledged)")
		limit   = fs.Duration("limit", time.Minute, "stop after this long")
	)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	rest := fs.Args()
	if len(rest) > 0 && rest[0] == "keygen" {
		if len(rest) != 3 {
			fs.Usage()
			return 2
		}
		k, c, err := devicesim.NewKey()
		if err == nil {
			err = writeSecret(rest[1], k)
		}
		if err == nil {
			err = os.WriteFile(rest[2], c, 0o644)
		}
		if err != nil {
			fmt.Fprintln(stderr, "devicesim keygen:", err)
			return 1
		}
		return 0
	}
	if *useCoAP == *useMQTT || *creds == "" || len(rest) == 0 {
		fs.Usage()
		return 2
	}
	c, err := devicesim.LoadCreds(*creds, *keyFile)
	if err != nil {
		fmt.Fprintln(stderr, "devicesim:", err)
		return 1
	}
	if *caFile != "" {
		b, err := os.ReadFile(*caFile)
		if err != nil {
			fmt.Fprintln(stderr, "devicesim:", err)
			return 1
		}
		c.CAPEM = string(b)
	}
	d := &devicesim.Device{Creds: c}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *useCoAP && *addr == "" {
		*addr = d.CoAPAddr("127.0.0.1", "127.0.0.1:5684")
	} else if *addr == "" {
		*addr = "127.0.0.1:8883"
	}
	if rest[0] == "firmware" {
		err = runFirmware(ctx, d, *useCoAP, *addr, rest[1:], stdout, stderr)
	} else if *useCoAP {
		err = runCoAP(ctx, d, *addr, rest, *qos, devicesim.LoadOptions{Count: *count, Rate: *rate, Limit: *limit}, stdout)
	} else {
		err = runMQTT(ctx, d, *addr, rest, byte(*qos), devicesim.LoadOptions{Count: *count, Rate: *rate, Limit: *limit}, stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "devicesim:", err)
		return 1
	}
	return 0
}

// telemetryPath turns a TOPIC argument into the path below t/; ok is false
// for a full topic outside the device's telemetry tree.
func telemetryPath(id, topic string) (string, bool) {
	if p, ok := strings.CutPrefix(topic, "devices/"+id+"/t/"); ok {
		return p, true
	}
	return topic, !strings.HasPrefix(topic, "devices/")
}

func report(w io.Writer, r devicesim.LoadResult) {
	if r.Sent <= 1 {
		return
	}
	fmt.Fprintf(w, "sent %d, accepted %d, refused %d in %v: %.0f msg/s, p50 %v, p99 %v\n",
		r.Sent, r.OK, r.Refused, r.Elapsed.Round(time.Millisecond), r.Throughput(), r.Percentile(50), r.Percentile(99))
}

func runCoAP(ctx context.Context, d *devicesim.Device, addr string, args []string, qos int, lo devicesim.LoadOptions, out io.Writer) error {
	if args[0] == "publish" && qos != 0 && qos != 1 {
		return fmt.Errorf("--qos %d: CoAP publishes with 0 (non-confirmable) or 1 (confirmable)", qos)
	}
	hctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	co, err := d.DialCoAP(hctx, addr)
	cancel()
	if err != nil {
		return err
	}
	defer co.Close()
	switch args[0] {
	case "publish":
		if len(args) != 3 {
			return errors.New("publish TOPIC PAYLOAD")
		}
		path, ok := telemetryPath(d.ID, args[1])
		if !ok {
			return fmt.Errorf("CoAP can only POST into the device's own tree, devices/%s/t/", d.ID)
		}
		r, err := devicesim.Load(ctx, lo, func(ctx context.Context, _ int) error {
			rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			res, err := co.PublishQoS(rctx, path, []byte(args[2]), byte(qos))
			if err != nil {
				return err
			}
			if res.Code != codes.Changed {
				if lo.Count == 1 {
					fmt.Fprintf(out, "%v %s\n", res.Code, res.Payload)
				}
				return fmt.Errorf("%w: %v %s", devicesim.ErrRefused, res.Code, res.Payload)
			}
			return nil
		})
		report(out, r)
		if lo.Count == 1 && r.Refused == 1 {
			return errors.New("refused")
		}
		return err
	case "observe":
		path := ""
		if len(args) > 1 {
			path = args[1]
		}
		// The registration answer carries the command in force, if any;
		// Cancel reports Observe numbers that went backwards.
		// Notifications wait until the answer's command is printed.
		printed := make(chan struct{})
		o, err := co.ObserveCommands(ctx, path, func(n devicesim.Notification) {
			<-printed
			fmt.Fprintf(out, "%s\n", n.Payload)
		})
		if err != nil {
			close(printed)
			return err
		}
		if len(o.First.Payload) > 0 {
			fmt.Fprintf(out, "%s\n", o.First.Payload)
		}
		close(printed)
		cancel := o.Cancel
		select {
		case <-ctx.Done():
		case <-co.Done():
			return errors.New("the gateway closed the session")
		}
		cctx, c2 := context.WithTimeout(context.Background(), 2*time.Second)
		defer c2()
		return cancel(cctx)
	}
	return fmt.Errorf("unknown command %q for --coap (publish, observe)", args[0])
}

func runMQTT(ctx context.Context, d *devicesim.Device, addr string, args []string, qos byte, lo devicesim.LoadOptions, out io.Writer) error {
	hctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var onMsg func(string, []byte)
	if args[0] == "subscribe" {
		onMsg = func(t string, p []byte) { fmt.Fprintf(out, "%s %s\n", t, p) }
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("--addr %q: %w", addr, err)
	}
	mq, err := d.DialMQTT(hctx, addr, onMsg)
	if err != nil {
		return err
	}
	defer mq.Close()
	switch args[0] {
	case "publish":
		if len(args) != 3 {
			return errors.New("publish TOPIC PAYLOAD")
		}
		// A full topic outside the device's tree is sent as given, so that a
		// demo can show the gateway refusing it.
		topic := args[1]
		if p, ok := telemetryPath(d.ID, args[1]); ok {
			topic = mq.TelemetryTopic(p)
		}
		r, err := devicesim.Load(ctx, lo, func(ctx context.Context, _ int) error {
			rc, err := mq.Publish(ctx, topic, qos, []byte(args[2]))
			if err != nil {
				return err
			}
			if rc >= 0x80 {
				return fmt.Errorf("%w: PUBACK reason 0x%02x", devicesim.ErrRefused, rc)
			}
			return nil
		})
		report(out, r)
		if lo.Count == 1 && r.Refused == 1 {
			return errors.New("refused by the gateway")
		}
		return err
	case "subscribe":
		path := "#"
		if len(args) > 1 {
			path = args[1]
		}
		f := "devices/" + d.ID + "/c/" + path
		rc, err := mq.Subscribe(ctx, f)
		if err != nil {
			return err
		}
		if rc >= 0x80 {
			return fmt.Errorf("subscribe %s refused: reason 0x%02x", f, rc)
		}
		select {
		case <-ctx.Done():
		case <-mq.Done():
			return errors.New("the gateway closed the session")
		}
		return nil
	}
	return fmt.Errorf("unknown command %q for --mqtt (publish, subscribe)", args[0])
}
