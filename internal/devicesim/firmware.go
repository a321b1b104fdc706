package devicesim

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// Firmware resources on the gateway (bridges/coap and the firmware HTTPS
// listener).
const (
	OfferPath       = "/fw/offer"
	StatusPath      = "/fw-status"
	maxFirmwareSize = 1 << 30
)

// FirmwareOptions says where a fetched image goes and how it is checked.
type FirmwareOptions struct {
	// Out is the image file. If it already holds part of the offered image
	// (an earlier attempt was interrupted), the download resumes after it.
	Out string
	// VendorKey is the key the device was "built with"; the vendor's
	// COSE_Sign1 manifest in the offer must verify with it. Nil checks
	// only the size and sha256 the offer names (and says so in the report).
	VendorKey crypto.PublicKey
	// Class is the device's own class; zero takes the offer's (a real
	// device knows its class; a simulated one may not).
	Class otacache.Class
}

// FirmwareResult is what a fetch did.
type FirmwareResult struct {
	Offer     otacache.Offer
	Fetched   otacache.Fetched
	Verified  bool // vendor signature checked too
	Status    otacache.DeviceStatus
	NoOffer   bool // the gateway had nothing newer for this device
	Transport string
}

// ParseVendorKey reads a vendor public key (PEM, PKIX).
func ParseVendorKey(pemBytes []byte) (crypto.PublicKey, error) {
	blk, _ := pem.Decode(pemBytes)
	if blk == nil {
		return nil, errors.New("vendor key: no PEM block")
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("vendor key: %w", err)
	}
	return k, nil
}

// FirmwareCoAP is a CoAPS session for firmware: block-wise transfer is off
// in the client so that the device asks for each Block2 itself and can
// resume from any block (otacache.FetchCoAP).
type FirmwareCoAP struct{ *CoAP }

// DialFirmwareCoAP does the DTLS handshake with the gateway at addr.
func (d *Device) DialFirmwareCoAP(ctx context.Context, addr string) (*FirmwareCoAP, error) {
	cfg, err := d.DTLSConfig(addr)
	if err != nil {
		return nil, err
	}
	c, err := d.dialWith(ctx, addr, cfg, options.WithBlockwise(false, blockwise.SZX1024, time.Minute))
	if err != nil {
		return nil, err
	}
	return &FirmwareCoAP{c}, nil
}

// Conn is the go-coap connection (block-wise off), for tests that send
// their own requests.
func (c *FirmwareCoAP) Conn() *udpclient.Conn { return c.cc }

// Offer GETs /fw/offer; ok is false when the gateway has nothing newer.
func (c *FirmwareCoAP) Offer(ctx context.Context) (o otacache.Offer, ok bool, err error) {
	resp, err := c.cc.Get(ctx, OfferPath)
	if err != nil {
		return o, false, fmt.Errorf("coap GET %s: %w", OfferPath, err)
	}
	return decodeOffer(resp)
}

func decodeOffer(resp *pool.Message) (otacache.Offer, bool, error) {
	var o otacache.Offer
	if resp.Code() != codes.Content {
		b, _ := resp.ReadBody()
		return o, false, fmt.Errorf("GET %s: %v %s", OfferPath, resp.Code(), b)
	}
	b, err := resp.ReadBody()
	if err != nil {
		return o, false, fmt.Errorf("GET %s: %w", OfferPath, err)
	}
	return ParseOffer(b)
}

// ParseOffer decodes an offer as the gateway sends it (CoAP /fw/offer,
// MQTT devices/{id}/c/fw/offer, HTTPS /fw/offer). An empty payload means
// no offer. The download path must be the content address of the offered
// sha256, so a gateway cannot point the device anywhere else; the
// manifest itself is checked later by otacache.VerifyImage.
func ParseOffer(b []byte) (otacache.Offer, bool, error) {
	var o otacache.Offer
	if len(b) == 0 {
		return o, false, nil
	}
	if len(b) > 64<<10 {
		return o, false, fmt.Errorf("offer of %d bytes: more than 64 KiB", len(b))
	}
	if err := json.Unmarshal(b, &o); err != nil {
		return o, false, fmt.Errorf("offer: %w", err)
	}
	ref, err := otacache.ParseFirmwarePath(o.Path)
	switch {
	case err != nil:
		return o, false, fmt.Errorf("offer: %w", err)
	case ref.SHA256 == "" || o.Path != "/fw/sha256/"+o.SHA256:
		return o, false, fmt.Errorf("offer: path %q is not /fw/sha256/ of the offered sha256 %q", o.Path, o.SHA256)
	case o.Size <= 0 || o.Size > maxFirmwareSize:
		return o, false, fmt.Errorf("offer: size %d out of range", o.Size)
	case len(o.Manifest) == 0:
		return o, false, errors.New("offer: no vendor manifest")
	}
	return o, true, nil
}

// ObserveOffer registers on /fw/offer; fn gets every offer the gateway
// announces after the first response (which is returned). cancel
// deregisters.
func (c *FirmwareCoAP) ObserveOffer(ctx context.Context, fn func(otacache.Offer)) (first []byte, cancel func(context.Context) error, err error) {
	firstC := make(chan []byte, 1)
	n := 0
	obs, err := c.cc.Observe(ctx, OfferPath, func(m *pool.Message) {
		n++
		b, _ := m.ReadBody()
		if n == 1 {
			firstC <- b
			return
		}
		// Offers are JSON; anything else on this resource is not an offer.
		if cf, err := m.ContentFormat(); err != nil || cf != message.AppJSON {
			return
		}
		if o, ok, err := ParseOffer(b); err == nil && ok {
			fn(o)
		}
	})
	if err != nil {
		return nil, nil, fmt.Errorf("coap observe %s: %w", OfferPath, err)
	}
	select {
	case first = <-firstC:
	case <-ctx.Done():
		_ = obs.Cancel(context.WithoutCancel(ctx))
		return nil, nil, fmt.Errorf("coap observe %s: no first response: %w", OfferPath, ctx.Err())
	}
	return first, func(ctx context.Context) error { return obs.Cancel(ctx) }, nil
}

// FetchFirmwareCoAP asks the gateway for an offer, downloads it with
// Block2 (resuming after what opt.Out already holds), verifies it and
// reports the result on /fw-status.
func (d *Device) FetchFirmwareCoAP(ctx context.Context, addr string, opt FirmwareOptions) (FirmwareResult, error) {
	res := FirmwareResult{Transport: "coap"}
	c, err := d.DialFirmwareCoAP(ctx, addr)
	if err != nil {
		return res, err
	}
	defer c.Close()
	o, ok, err := c.Offer(ctx)
	if err != nil || !ok {
		res.NoOffer = !ok
		return res, err
	}
	res.Offer = o
	report := func(st otacache.DeviceStatus) error {
		return otacache.ReportStatusCoAP(ctx, c.cc, StatusPath, st)
	}
	f, from, err := openResume(opt.Out, o)
	if err != nil {
		return res, err
	}
	defer f.Close()
	if err := report(otacache.DeviceStatus{State: otacache.StateDownloading, Version: o.Version, SHA256: o.SHA256}); err != nil {
		return res, err
	}
	res.Fetched, err = otacache.FetchCoAP(ctx, c.cc, o.Path, f, from, blockwise.SZX1024, o.Size)
	if err != nil {
		_ = report(otacache.DeviceStatus{State: otacache.StateFailed, Version: o.Version, SHA256: o.SHA256, Detail: "download failed"})
		return res, err
	}
	return res, finish(&res, f, opt, report)
}

// FetchFirmwareHTTPS is the same for a device that speaks MQTT: the offer
// and the image come from the gateway's firmware HTTPS listener (mutual
// TLS, Range resume after what opt.Out holds) and the status goes out as
// an MQTT publish on devices/{id}/s/fw through mq.
func (d *Device) FetchFirmwareHTTPS(ctx context.Context, httpsAddr string, mq *MQTT, opt FirmwareOptions) (FirmwareResult, error) {
	res := FirmwareResult{Transport: "https"}
	hc, err := d.HTTPSClient(httpsAddr)
	if err != nil {
		return res, err
	}
	defer hc.CloseIdleConnections()
	base := "https://" + httpsAddr
	o, ok, err := HTTPSOffer(ctx, hc, base)
	if err != nil || !ok {
		res.NoOffer = !ok
		return res, err
	}
	res.Offer = o
	report := func(st otacache.DeviceStatus) error {
		b, err := otacache.MarshalStatusReport(st)
		if err != nil {
			return err
		}
		rc, err := mq.Publish(ctx, "devices/"+d.ID+"/s/fw", 1, b)
		if err != nil {
			return fmt.Errorf("report status: %w", err)
		}
		if rc >= 0x80 {
			return fmt.Errorf("report status: PUBACK reason 0x%02x", rc)
		}
		return nil
	}
	f, from, err := openResume(opt.Out, o)
	if err != nil {
		return res, err
	}
	defer f.Close()
	if err := report(otacache.DeviceStatus{State: otacache.StateDownloading, Version: o.Version, SHA256: o.SHA256}); err != nil {
		return res, err
	}
	etag := ""
	if from > 0 {
		etag = `"` + o.SHA256 + `"`
	}
	res.Fetched, err = otacache.FetchHTTPS(ctx, hc, base+o.Path, f, from, etag, o.Size)
	if err == nil && res.Fetched.ResumedAt == 0 {
		err = f.Truncate(res.Fetched.Size)
	}
	if err != nil {
		_ = report(otacache.DeviceStatus{State: otacache.StateFailed, Version: o.Version, SHA256: o.SHA256, Detail: "download failed"})
		return res, err
	}
	return res, finish(&res, f, opt, report)
}

// HTTPSClient is an HTTP client with the device's certificate that trusts
// the gateway's CA.
func (d *Device) HTTPSClient(addr string) (*http.Client, error) {
	tc, err := d.TLSConfig(addr)
	if err != nil {
		return nil, err
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true}, Timeout: 10 * time.Minute}, nil
}

// HTTPSOffer GETs base+/fw/offer; ok is false when there is none (204).
func HTTPSOffer(ctx context.Context, hc *http.Client, base string) (otacache.Offer, bool, error) {
	var o otacache.Offer
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+OfferPath, nil)
	if err != nil {
		return o, false, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return o, false, fmt.Errorf("GET %s: %w", OfferPath, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	switch {
	case err != nil:
		return o, false, fmt.Errorf("GET %s: %w", OfferPath, err)
	case resp.StatusCode == http.StatusNoContent:
		return o, false, nil
	case resp.StatusCode != http.StatusOK:
		return o, false, fmt.Errorf("GET %s: %s: %s", OfferPath, resp.Status, bytes.TrimSpace(b))
	}
	return ParseOffer(b)
}

// openResume opens the output file and returns how many bytes of it can
// be kept: what an earlier attempt wrote, never more than the offer.
func openResume(path string, o otacache.Offer) (*os.File, int64, error) {
	if path == "" {
		return nil, 0, errors.New("firmware fetch: no output file")
	}
	if o.Size <= 0 || o.Size > maxFirmwareSize {
		return nil, 0, fmt.Errorf("firmware fetch: offered size %d out of range", o.Size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("firmware fetch: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("firmware fetch: %w", err)
	}
	from := st.Size()
	if from >= o.Size {
		from = 0 // complete or foreign: fetch again
		if err := f.Truncate(0); err != nil {
			f.Close()
			return nil, 0, fmt.Errorf("firmware fetch: %w", err)
		}
	}
	return f, from, nil
}

// finish verifies the downloaded image and reports verified or failed.
func finish(res *FirmwareResult, f *os.File, opt FirmwareOptions, report func(otacache.DeviceStatus) error) error {
	o := res.Offer
	if err := f.Sync(); err != nil {
		return fmt.Errorf("firmware fetch: %w", err)
	}
	var verr error
	if opt.VendorKey != nil {
		cl := opt.Class
		if cl == (otacache.Class{}) {
			cl = o.Class
		}
		_, verr = otacache.VerifyImage(f, o, cl, opt.VendorKey)
		res.Verified = verr == nil
	} else {
		verr = verifyHash(f, o)
	}
	st := otacache.DeviceStatus{State: otacache.StateVerified, Version: o.Version, SHA256: o.SHA256}
	if opt.VendorKey == nil {
		st.Detail = "sha256 checked; no vendor key given, signature not checked"
	}
	if verr != nil {
		st = otacache.DeviceStatus{State: otacache.StateFailed, Version: o.Version, SHA256: o.SHA256, Detail: "verification failed"}
	}
	res.Status = st
	if err := report(st); err != nil {
		return err
	}
	return verr
}

func verifyHash(f *os.File, o otacache.Offer) error {
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, 0, o.Size+1))
	if err != nil {
		return fmt.Errorf("hash %s: %w", f.Name(), err)
	}
	if got := fmt.Sprintf("%x", h.Sum(nil)); n != o.Size || got != o.SHA256 {
		return fmt.Errorf("image %s: %d bytes with sha256 %s, the offer says %d bytes, %s: %w", f.Name(), n, got, o.Size, o.SHA256, otacache.ErrImageMismatch)
	}
	return nil
}
