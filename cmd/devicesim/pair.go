package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/bastion-iot/bastion/gateway/button"
	"github.com/bastion-iot/bastion/internal/devicesim"
)

const pairUsage = `usage:
  devicesim pair --code CODE --id ID [--psk] [--addr HOST:PSKPORT] --out CREDS   (setup code: SPAKE2+ then EST)
  devicesim pair --https --code CODE --id ID --addr HOST:ESTPORT --out CREDS     (setup code over HTTPS, MQTT-only devices)
  devicesim pair --idevid CERT.pem --key KEY.pem --ca ROOT.pem [--addr HOST:PORT] --out CREDS
  devicesim press-button --fifo PATH [--hold 1.5s]   (dev gateway: STATE/button.fifo)

pair needs an open pairing window (press the gateway's button first). CREDS
is written 0600 and works with: devicesim --coap|--mqtt --creds CREDS publish ...
`

func runPair(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("devicesim pair", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, pairUsage); fs.PrintDefaults() }
	var (
		code    = fs.String("code", "", "setup code from the device's label")
		id      = fs.String("id", "", "device id from the device's label (with --code)")
		idevid  = fs.String("idevid", "", "manufacturer certificate PEM (IDevID)")
		keyFile = fs.String("key", "", "IDevID private key PEM")
		caFile  = fs.String("ca", "", "gateway root CA PEM (with --idevid)")
		addr    = fs.String("addr", "", "gateway address (default 127.0.0.1:5685 for --code, 127.0.0.1:5684 for --idevid)")
		out     = fs.String("out", "", "credentials file to write")
		usePSK  = fs.Bool("psk", false, "ask for an operational PSK instead of a certificate (with --code)")
		limit   = fs.Duration("limit", 30*time.Second, "give up after this long")
		https   = fs.Bool("https", false, "pair over HTTPS on the gateway's pairing.est_listen (with --code; --addr required)")
	)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *out == "" || (*code == "") == (*idevid == "") || (*code != "" && *id == "") || (*idevid != "" && (*keyFile == "" || *caFile == "")) ||
		(*https && (*code == "" || *addr == "" || *usePSK)) {
		fs.Usage()
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *limit)
	defer cancel()
	var c devicesim.Creds
	var err error
	if *https {
		c, err = devicesim.PairCodeHTTPS(ctx, *addr, *id, *code, devicesim.HTTPSOptions{})
	} else if *code != "" {
		if *addr == "" {
			*addr = "127.0.0.1:5685"
		}
		c, err = devicesim.PairCode(ctx, *addr, *id, *code, devicesim.PairOptions{PSK: *usePSK})
	} else {
		if *addr == "" {
			*addr = "127.0.0.1:5684"
		}
		c, err = pairIDevID(ctx, *addr, *idevid, *keyFile, *caFile)
	}
	if err == nil {
		var b []byte
		b, err = json.MarshalIndent(c, "", "  ")
		if err == nil {
			err = writeSecret(*out, append(b, '\n'))
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "devicesim pair:", err)
		return 1
	}
	fmt.Fprintf(stdout, "paired: device %s, credentials in %s\n", c.ID, *out)
	return 0
}

func pairIDevID(ctx context.Context, addr, certFile, keyFile, caFile string) (devicesim.Creds, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return devicesim.Creds{}, fmt.Errorf("idevid: %w", err)
	}
	b, err := os.ReadFile(caFile)
	if err != nil {
		return devicesim.Creds{}, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(b) {
		return devicesim.Creds{}, fmt.Errorf("--ca %s holds no PEM certificate", caFile)
	}
	return devicesim.PairIDevID(ctx, addr, cert, roots)
}

func runPress(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("devicesim press-button", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, pairUsage); fs.PrintDefaults() }
	fifo := fs.String("fifo", "", "the gateway's button FIFO (dev: STATE/button.fifo)")
	hold := fs.Duration("hold", 1500*time.Millisecond, "how long the button is held (1-10 s opens a window, 10 s or more cancels)")
	code := fs.Uint("key-code", button.KeyWPSButton, "key code (default KEY_WPS_BUTTON)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *fifo == "" || *hold <= 0 || *code > 0xffff {
		fs.Usage()
		return 2
	}
	if err := devicesim.PressButton(*fifo, *hold, uint16(*code)); err != nil {
		fmt.Fprintln(stderr, "devicesim:", err)
		return 1
	}
	fmt.Fprintf(stdout, "pressed for %v\n", *hold)
	return 0
}
