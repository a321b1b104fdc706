package otacache

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
)

// ServeCoAP answers GET /fw/sha256/{sha256} and GET /fw/{vendor}/{model}
// for an authenticated device (its identity comes from the DTLS session).
// Any other method gets 4.05.
//
// The response body is a reader over the verified image file: the CoAP
// server (ServeDTLS) cuts the block a request asks for out of it (Block2,
// RFC 7959) by reading at the block's offset, so a device resumes from any
// block without server state. Every block carries the image's ETag, so a
// device that resumes can tell that the image did not change.
func (c *Cache) ServeCoAP(w mux.ResponseWriter, r *mux.Message, device string) {
	refuse := func(code codes.Code, msg string) {
		c.count(func(k *Counters) { k.ServeRefused++ })
		c.log.Info("firmware request refused", "device", device, "transport", "coap", "code", code.String(), "reason", msg)
		_ = w.SetResponse(code, message.TextPlain, strings.NewReader(msg))
	}
	if r.Code() != codes.GET {
		refuse(codes.MethodNotAllowed, "firmware is download-only: GET")
		return
	}
	ref, ok := firmwareRefFromOptions(r.Options())
	if !ok {
		p, err := r.Path()
		if err != nil {
			refuse(codes.BadRequest, "no Uri-Path")
			return
		}
		if ref, err = ParseFirmwarePath(p); err != nil {
			refuse(codes.NotFound, err.Error())
			return
		}
	}
	img, err := c.imageForServe(device, ref)
	if err != nil {
		refuse(coapCode(err), err.Error())
		return
	}
	if err := w.SetResponse(codes.Content, message.AppOctets, img.coapBody()); err != nil {
		c.log.Warn("coap response", "device", device, "err", err)
		return
	}
	w.Message().SetOptionBytes(message.ETag, img.etag())
	if img.size <= 1<<32-1 {
		w.Message().SetOptionUint32(message.Size2, uint32(img.size))
	}
	if blk, err := r.Options().GetUint32(message.Block2); err != nil || blk>>4 == 0 {
		// Count transfers, not blocks: a fresh request or block 0.
		c.count(func(k *Counters) { k.Served++ })
	}
}

// firmwareRefFromOptions is ParseFirmwarePath of the request's Uri-Path
// read straight from its options, without joining them into a string and
// splitting it again (every firmware block asks): ok only for a path that
// ParseFirmwarePath(opts.Path()) accepts, with the same answer; anything
// else (refusals, with their messages) is left to that.
func firmwareRefFromOptions(opts message.Options) (FirmwareRef, bool) {
	var segs [3][]byte
	n, size := 0, 0
	for _, o := range opts {
		if o.ID != message.URIPath {
			continue
		}
		// No '/' or UTF-8 check: every segment accepted below is ASCII
		// without '/' ("fw", "sha256", hex digits, or a validated Class).
		if n == len(segs) {
			return FirmwareRef{}, false
		}
		segs[n] = o.Value
		n++
		size += 1 + len(o.Value)
	}
	if n != 3 || size > 200 || string(segs[0]) != "fw" {
		return FirmwareRef{}, false
	}
	if string(segs[1]) == "sha256" {
		if !isSHA256Hex(string(segs[2])) {
			return FirmwareRef{}, false
		}
		return FirmwareRef{SHA256: string(segs[2])}, true
	}
	cl := Class{Vendor: string(segs[1]), Model: string(segs[2])}
	if cl.Validate() != nil {
		return FirmwareRef{}, false
	}
	return FirmwareRef{Class: cl}, true
}

func coapCode(err error) codes.Code {
	var se *serveError
	if errors.As(err, &se) {
		switch se.kind {
		case errForbidden:
			return codes.Forbidden
		case errNotFound:
			return codes.NotFound
		case errUnavailable:
			return codes.ServiceUnavailable
		}
	}
	return codes.InternalServerError
}

func httpCode(err error) int {
	var se *serveError
	if errors.As(err, &se) {
		switch se.kind {
		case errForbidden:
			return http.StatusForbidden
		case errNotFound:
			return http.StatusNotFound
		case errUnavailable:
			return http.StatusServiceUnavailable
		}
	}
	return http.StatusInternalServerError
}

// HTTPLimits bound what one device can hold of the HTTPS server while it
// downloads: an image is up to 256 MiB, and a device that asks for one and
// then stops reading would otherwise keep a goroutine, buffers, a file
// descriptor and a full socket buffer for as long as its connection lives
// (http.Server's IdleTimeout does not apply in the middle of a response).
// Zero fields take their defaults.
type HTTPLimits struct {
	// WriteStall ends a response when one write of it (16 KiB at most)
	// makes no progress for this long (default 30s). Each write gets a
	// fresh deadline, so a long download over a slow link completes: it
	// needs 16 KiB per WriteStall, about 4.4 kbit/s at the default.
	WriteStall time.Duration
	// PerDevice is the most image responses one device may have in
	// progress at once (default 2: a device that reconnects while its old
	// connection has not yet timed out can start again). More get 503 with
	// Retry-After.
	PerDevice int
	// Recheck is how often, at most, a transfer in progress asks identify
	// (and the Devices) again (default 1s), so that a device revoked in the
	// middle of a download gets no more of it.
	Recheck time.Duration
}

func (l *HTTPLimits) setDefaults() {
	if l.WriteStall <= 0 {
		l.WriteStall = 30 * time.Second
	}
	if l.PerDevice <= 0 {
		l.PerDevice = 2
	}
	if l.Recheck <= 0 {
		l.Recheck = time.Second
	}
}

// transferChunk is the most one write of an image response passes on:
// the progress the WriteStall deadline asks for (one TLS record).
const transferChunk = 16 << 10

// HTTPHandler serves the same paths over HTTPS for devices that speak
// MQTT: GET only, with Range and If-Range (a device resumes an interrupted
// download with "Range: bytes=N-" and "If-Range" set to the ETag, the
// quoted sha256). identify returns the device identity the listener's
// mutual TLS authenticated; the listener must require client certificates.
// lim bounds each device's downloads (HTTPLimits).
func (c *Cache) HTTPHandler(identify func(*http.Request) (device string, ok bool), lim HTTPLimits) http.Handler {
	lim.setDefaults()
	busy := &deviceSlots{max: lim.PerDevice, n: map[string]int{}}
	retryAfter := strconv.Itoa(int((lim.WriteStall + time.Second - 1) / time.Second))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		// Whatever is answered, a device that reads none of it does not
		// hold this goroutine past WriteStall. (Not supported only where w
		// is no connection's, as in a test's recorder.)
		_ = rc.SetWriteDeadline(time.Now().Add(lim.WriteStall))
		refuse := func(device string, code int, msg string) {
			c.count(func(k *Counters) { k.ServeRefused++ })
			c.log.Info("firmware request refused", "device", device, "transport", "https", "code", code, "reason", msg)
			http.Error(w, msg, code)
		}
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", http.MethodGet)
			refuse("", http.StatusMethodNotAllowed, "firmware is download-only: GET")
			return
		}
		device, ok := identify(r)
		if !ok {
			refuse("", http.StatusForbidden, "no authenticated device identity on this connection")
			return
		}
		ref, err := ParseFirmwarePath(r.URL.Path)
		if err != nil {
			refuse(device, http.StatusNotFound, err.Error())
			return
		}
		img, err := c.imageForServe(device, ref)
		if err != nil {
			refuse(device, httpCode(err), err.Error())
			return
		}
		if !busy.take(device) {
			w.Header().Set("Retry-After", retryAfter)
			refuse(device, http.StatusServiceUnavailable, fmt.Sprintf("device already has %d firmware downloads in progress", lim.PerDevice))
			return
		}
		defer busy.give(device)
		h := w.Header()
		h.Set("Content-Type", "application/octet-stream")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Cache-Control", "private, no-transform")
		h.Set("ETag", `"`+img.sha+`"`)
		if r.Header.Get("Range") == "" {
			c.count(func(k *Counters) { k.Served++ })
		}
		tw := &transferWriter{ResponseWriter: w, rc: rc, stall: lim.WriteStall, every: lim.Recheck, checked: time.Now(),
			recheck: func() error {
				if d, ok := identify(r); !ok || d != device {
					return errIdentityGone
				}
				if _, ok := c.devices.Device(device); !ok {
					return errIdentityGone
				}
				return nil
			}}
		http.ServeContent(tw, r, "", time.Time{}, io.NewSectionReader(img.f, 0, img.size))
		switch {
		case errors.Is(tw.err, os.ErrDeadlineExceeded):
			c.count(func(k *Counters) { k.ServeCut++ })
			c.log.Info("firmware transfer ended: the device read nothing", "device", device, "transport", "https", "sha256", img.sha, "write_stall", lim.WriteStall)
		case errors.Is(tw.err, errIdentityGone):
			c.count(func(k *Counters) { k.ServeCut++ })
			c.log.Info("firmware transfer ended: the device is no longer authenticated (revoked or removed)", "device", device, "transport", "https", "sha256", img.sha)
		}
	})
}

// errIdentityGone ends a transfer whose device lost its identity (its
// certificate revoked or retired, the device removed) after it began.
var errIdentityGone = errors.New("device no longer authenticated")

// deviceSlots counts the image responses in progress per device.
type deviceSlots struct {
	max int
	mu  sync.Mutex
	n   map[string]int
}

func (s *deviceSlots) take(device string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.n[device] >= s.max {
		return false
	}
	s.n[device]++
	return true
}

func (s *deviceSlots) give(device string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.n[device]--; s.n[device] <= 0 {
		delete(s.n, device)
	}
}

// transferWriter is an image response's writer: each write of at most
// transferChunk gets a fresh deadline of stall from now, and at most once
// per every the device's identity is checked again. After its first error
// it writes nothing more (http.ServeContent ignores write errors; err
// keeps it for the log).
type transferWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	stall   time.Duration
	every   time.Duration
	checked time.Time
	recheck func() error
	err     error
}

func (tw *transferWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 && tw.err == nil {
		if now := time.Now(); now.Sub(tw.checked) >= tw.every {
			tw.checked = now
			if tw.err = tw.recheck(); tw.err != nil {
				break
			}
		}
		_ = tw.rc.SetWriteDeadline(time.Now().Add(tw.stall))
		m, err := tw.ResponseWriter.Write(p[:min(len(p), transferChunk)])
		n += m
		p = p[m:]
		tw.err = err
	}
	return n, tw.err
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (tw *transferWriter) Unwrap() http.ResponseWriter { return tw.ResponseWriter }

// StatusReportRefused counts a device status report refused with err in
// Counters.StatusRefused, for a transport that takes reports itself (the
// gateway's MQTT mirror calls ReportStatus). A report refused because it
// could not be stored (the gateway's fault, not the device's) is not
// counted: err wraps errStatusNotStored then.
func (c *Cache) StatusReportRefused(err error) {
	if err == nil || errors.Is(err, errStatusNotStored) {
		return
	}
	c.count(func(k *Counters) { k.StatusRefused++ })
}

// MaxStatusReport bounds a status report's body (ServeCoAPStatus reads no
// more of it).
const MaxStatusReport = 2048

// ServeCoAPStatus takes a device's update status report: POST (or PUT)
// with the JSON of DeviceStatus, answered 2.04. It is a separate resource
// from the download-only /fw/ tree (suggested path: /fw-status).
func (c *Cache) ServeCoAPStatus(w mux.ResponseWriter, r *mux.Message, device string) {
	if r.Code() != codes.POST && r.Code() != codes.PUT {
		c.StatusReportRefused(errors.New("status reports: POST or PUT"))
		_ = w.SetResponse(codes.MethodNotAllowed, message.TextPlain, strings.NewReader("status reports: POST or PUT"))
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body(), MaxStatusReport))
	if err != nil {
		c.StatusReportRefused(err)
		_ = w.SetResponse(codes.BadRequest, message.TextPlain, strings.NewReader("unreadable payload"))
		return
	}
	st, err := ParseStatusReport(body)
	if err == nil {
		err = c.ReportStatus(device, st)
	}
	if errors.Is(err, errStatusNotStored) {
		c.log.Error("status report not stored", "device", device, "err", err)
		_ = w.SetResponse(codes.InternalServerError, message.TextPlain, strings.NewReader("status report not stored on the gateway; retry later"))
		return
	}
	if err != nil {
		c.StatusReportRefused(err)
		c.log.Info("status report refused", "device", device, "reason", err)
		_ = w.SetResponse(codes.BadRequest, message.TextPlain, strings.NewReader(err.Error()))
		return
	}
	_ = w.SetResponse(codes.Changed, message.TextPlain, nil)
}
