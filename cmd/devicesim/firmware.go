package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/bastion-iot/bastion/internal/devicesim"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

const firmwareUsage = `usage:
  devicesim --coap --creds FILE [--addr HOST:PORT] firmware fetch --out FILE [--vendor-key PEM] [--vendor V --model M]
  devicesim --mqtt --creds FILE --key KEY [--addr HOST:PORT] firmware fetch --out FILE [--https HOST:PORT] [--vendor-key PEM]

Asks the gateway for an update offer, downloads it (CoAPS Block2, or HTTPS
with Range; an interrupted earlier download in --out is resumed), checks
its size and sha256 and, with --vendor-key, the vendor's COSE signature,
and reports the result (CoAP POST /fw-status, or MQTT devices/{id}/s/fw).
`

// runFirmware is "firmware fetch"; addr is the CoAPS or MQTT address.
func runFirmware(ctx context.Context, d *devicesim.Device, coap bool, addr string, args []string, out, errw io.Writer) error {
	fs := flag.NewFlagSet("devicesim firmware", flag.ContinueOnError)
	fs.SetOutput(errw)
	fs.Usage = func() { fmt.Fprint(errw, firmwareUsage); fs.PrintDefaults() }
	var (
		outFile   = fs.String("out", "", "image file (resumed if it holds part of the offered image)")
		vendorKey = fs.String("vendor-key", "", "vendor public key PEM: verify the COSE_Sign1 manifest")
		vendor    = fs.String("vendor", "", "this device's vendor (default: the offer's)")
		model     = fs.String("model", "", "this device's model (default: the offer's)")
		httpsAddr = fs.String("https", "127.0.0.1:8444", "gateway firmware HTTPS address (--mqtt)")
		limit     = fs.Duration("limit", 10*time.Minute, "give up after this long")
	)
	if len(args) == 0 || args[0] != "fetch" {
		fs.Usage()
		return errors.New("firmware: want the subcommand fetch")
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *outFile == "" {
		fs.Usage()
		return errors.New("firmware fetch: --out is required")
	}
	opt := devicesim.FirmwareOptions{Out: *outFile, Class: otacache.Class{Vendor: *vendor, Model: *model}}
	if *vendorKey != "" {
		b, err := os.ReadFile(*vendorKey)
		if err != nil {
			return fmt.Errorf("--vendor-key: %w", err)
		}
		if opt.VendorKey, err = devicesim.ParseVendorKey(b); err != nil {
			return fmt.Errorf("--vendor-key %s: %w", *vendorKey, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, *limit)
	defer cancel()
	var res devicesim.FirmwareResult
	var err error
	if coap {
		res, err = d.FetchFirmwareCoAP(ctx, addr, opt)
	} else {
		mq, derr := d.DialMQTT(ctx, addr, nil)
		if derr != nil {
			return derr
		}
		defer mq.Close()
		res, err = d.FetchFirmwareHTTPS(ctx, *httpsAddr, mq, opt)
	}
	if res.NoOffer && err == nil {
		fmt.Fprintln(out, "no update offered")
		return nil
	}
	if res.Offer.SHA256 != "" {
		fmt.Fprintf(out, "offer %s/%s %s: %d bytes, sha256 %s\n", res.Offer.Class.Vendor, res.Offer.Class.Model, res.Offer.Version, res.Offer.Size, res.Offer.SHA256)
	}
	if err != nil {
		return err
	}
	sig := "vendor signature verified"
	if !res.Verified {
		sig = "sha256 verified (no --vendor-key: signature not checked)"
	}
	fmt.Fprintf(out, "fetched %d bytes over %s (resumed at %d) into %s: %s; reported %s\n",
		res.Fetched.Size, res.Transport, res.Fetched.ResumedAt, *outFile, sig, res.Status.State)
	return nil
}
