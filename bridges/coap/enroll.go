package coap

import (
	"context"
	"crypto/x509"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki/est"
)

// Kind is what a DTLS session may reach. It is decided once, after the
// handshake, from the identity the handshake proved, and checked on every
// request: an enrollment session never reaches telemetry or commands, and
// an operational session never reaches enrollment.
type Kind int

const (
	// KindDevice: operational credentials. Telemetry, commands, EST /crts
	// and /sren (renewal with the current certificate).
	KindDevice Kind = iota
	// KindPAKE: the setup-code exchange only (PAKEPath), in a DTLS-PSK
	// session keyed with a public PSK; SPAKE2+ does the authentication.
	KindPAKE
	// KindEnroll: EST /sen and /crts only, in a session the PAKE's key or
	// a vendor's IDevID authenticated, while the pairing window is open.
	KindEnroll
	// KindNone: nothing (an identity the gateway did not classify).
	KindNone
)

func (k Kind) String() string {
	switch k {
	case KindDevice:
		return "device"
	case KindPAKE:
		return "pake"
	case KindEnroll:
		return "enroll"
	}
	return "none"
}

// PAKEPath is the resource of the setup-code exchange: each of its two
// round trips is one confirmable POST of a pairing.PAKEMessage.
const PAKEPath = "/.well-known/bastion/pake"

// PSKPath is where a PSK-only device in an enrollment session asks for an
// operational PSK instead of a certificate (POST, empty body; the answer is
// JSON {"id", "psk_identity", "psk"}, content format 50).
const PSKPath = "/.well-known/bastion/psk"

// maxEnrollBody bounds PAKE and EST request bodies.
const maxEnrollBody = est.MaxCSRSize

// Enrollment is the gateway's pairing service as the CoAP server sees it.
// Without one (Config.Enroll nil) only KindDevice sessions exist and the
// EST and PAKE resources answer 4.04.
type Enrollment interface {
	// Kind classifies the device identity a handshake proved (what
	// bridges.Identity returned).
	Kind(device string) Kind
	// PAKE answers one message of the setup-code exchange of a KindPAKE
	// session; an error is sent as 4.03 with its text (no secrets).
	PAKE(ctx context.Context, device string, msg []byte) ([]byte, error)
	// EST answers an EST-coaps request of a KindEnroll or KindDevice
	// session; peer is the session's client certificate chain, if any.
	EST(ctx context.Context, device string, kind Kind, peer []*x509.Certificate, r est.Request) est.Response
	// EnrollPSK issues an operational PSK to the device of a KindEnroll
	// session (PSKPath) and returns the JSON answer.
	EnrollPSK(ctx context.Context, device string) ([]byte, error)
}

// EnrollmentEnd is an Enrollment that says when the enrollment sessions
// it admitted must end (the pairing window closed). New subscribes: the
// server then ends every KindPAKE and KindEnroll session but those of the
// identity kept (the device that just enrolled, whose answer is still on
// its way; "" for none), and checks again the credentials of a session
// whose handshake was checked before (endEnrollment). f must not block;
// it may run on any goroutine.
type EnrollmentEnd interface {
	OnEnrollmentEnd(f func(kept string))
}

// endEnrollment ends every enrollment session (KindPAKE, KindEnroll) but
// kept's, each counted as ReasonPairingClosed, and makes onNewConn check
// again a session whose credentials were checked before: it runs as the
// window closes, from inside the pairing service, and does not block.
func (s *Server) endEnrollment(kept string) {
	var ccs []*otacache.DTLSConn
	s.mu.Lock()
	if s.stopped {
		// Run has closed every session, or is closing them.
		s.mu.Unlock()
		return
	}
	s.revGen++
	for dev, l := range s.byDevice {
		if k := s.cfg.Enroll.Kind(dev); dev != kept && (k == KindPAKE || k == KindEnroll) {
			ccs = append(ccs, l...)
			delete(s.byDevice, dev)
			for _, cc := range l {
				s.enrolling.forget(cc)
			}
		}
	}
	if len(ccs) > 0 {
		s.closing.Add(1) // under mu: Run waits for closing after stopped
	}
	s.mu.Unlock()
	if len(ccs) == 0 {
		return
	}
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonPairingClosed).Add(float64(len(ccs)))
	s.log.Info("coap: enrollment sessions closed with the pairing window", "sessions", len(ccs), "reason", hub.ReasonPairingClosed)
	s.closeAdded(ccs, enrollEndGrace)
}

// enrollEndGrace is how long an enrollment session ended by the window's
// close lives on (out of byDevice, so counted ended at once): the answer
// to the request that closed the window (the overlap's refusal, the last
// failure's) is still to be written. Whatever the session sends meanwhile
// is refused without a window.
const enrollEndGrace = 2 * time.Second

// enrollInfo is what a session may reach and the certificates it proved.
type enrollInfo struct {
	kind Kind
	peer []*x509.Certificate
}

// classify runs once per session, in onNewConn.
func (s *Server) classify(device string, st peerIdentity) enrollInfo {
	info := enrollInfo{kind: KindDevice}
	if s.cfg.Enroll != nil {
		info.kind = s.cfg.Enroll.Kind(device)
	} else if strings.Contains(device, ":") {
		// Real device ids never contain ':'; an enrollment identity with
		// no enrollment service reaches nothing.
		info.kind = KindNone
	}
	for _, raw := range st.PeerCertificates {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			break
		}
		info.peer = append(info.peer, c)
	}
	return info
}

// routeSession checks what the session may reach, then routes.
func (s *Server) routeSession(ctx context.Context, m *pool.Message, se *session, r request) response {
	path := "/" + strings.TrimPrefix(r.path, "/")
	kind := se.enroll.kind
	switch {
	case kind == KindDevice && s.cfg.Enroll != nil && path == est.PathSen:
		return s.refuseEnroll(se, path, "enrollment (/sen) is only for a new device in a pairing window; renew with /sren")
	case kind == KindDevice && s.cfg.Enroll != nil && (path == est.PathCrts || path == est.PathSren):
		return s.est(ctx, m, se, r, path)
	case kind == KindDevice:
		return s.route(se.device, r)
	case kind == KindPAKE && path == PAKEPath:
		return s.pake(ctx, se, r)
	case kind == KindEnroll && (path == est.PathSen || path == est.PathCrts):
		return s.est(ctx, m, se, r, path)
	case kind == KindEnroll && path == PSKPath:
		return s.enrollPSK(ctx, se, r)
	}
	return s.refuseEnroll(se, path, "this "+kind.String()+" session may not reach "+path)
}

func (s *Server) refuseEnroll(se *session, path, why string) response {
	s.sessionLine(se, slog.LevelWarn, "outside", "coap: request refused: outside what the session may reach", "kind", se.enroll.kind.String(), "path", ratelog.Clip(path, ratelog.MaxText))
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest).Inc()
	return diag(codes.Forbidden, "%s", why)
}

func readBody(r request) ([]byte, bool) {
	if r.body == nil || r.bodySize == 0 {
		return nil, true
	}
	if r.bodySize > maxEnrollBody {
		return nil, false
	}
	b := make([]byte, r.bodySize)
	if _, err := r.body.Seek(0, io.SeekStart); err != nil {
		return nil, false
	}
	if _, err := io.ReadFull(r.body, b); err != nil {
		return nil, false
	}
	return b, true
}

func (s *Server) pake(ctx context.Context, se *session, r request) response {
	if r.code != codes.POST {
		return diag(codes.MethodNotAllowed, "%s allows POST", PAKEPath)
	}
	body, ok := readBody(r)
	if !ok {
		return diag(codes.RequestEntityTooLarge, "pairing message unreadable or over %d bytes", maxEnrollBody)
	}
	reply, err := s.cfg.Enroll.PAKE(ctx, se.device, body)
	if err != nil {
		s.sessionLine(se, slog.LevelWarn, "pake", "coap: pairing exchange refused", "err", ratelog.ClipErr(err))
		return diag(codes.Forbidden, "%v", err)
	}
	return response{code: codes.Changed, format: message.AppOctets, body: reply}
}

func (s *Server) est(ctx context.Context, m *pool.Message, se *session, r request, path string) response {
	req := est.Request{Path: path, ContentFormat: est.NoFormat, Accept: est.NoFormat}
	switch r.code {
	case codes.GET:
		req.Method = "GET"
	case codes.POST:
		req.Method = "POST"
	default:
		req.Method = r.code.String()
	}
	if r.format >= 0 {
		req.ContentFormat = int(r.format)
	}
	if a, err := m.Accept(); err == nil {
		req.Accept = int(a)
	}
	body, ok := readBody(r)
	if !ok {
		res := diag(codes.RequestEntityTooLarge, "EST request over %d bytes", maxEnrollBody)
		res.size1 = maxEnrollBody
		return res
	}
	req.Payload = body
	out := s.cfg.Enroll.EST(ctx, se.device, se.enroll.kind, se.enroll.peer, req)
	if out.Err != nil {
		s.sessionLine(se, slog.LevelWarn, "est", "coap: EST request refused", "path", path, "code", out.Code.String(), "err", ratelog.ClipErr(out.Err))
	}
	res := response{code: codes.Code(out.Code), body: out.Payload, format: message.TextPlain}
	if out.ContentFormat != est.NoFormat {
		res.format = message.MediaType(out.ContentFormat)
	}
	return res
}

func (s *Server) enrollPSK(ctx context.Context, se *session, r request) response {
	if r.code != codes.POST {
		return diag(codes.MethodNotAllowed, "%s allows POST", PSKPath)
	}
	body, err := s.cfg.Enroll.EnrollPSK(ctx, se.device)
	if err != nil {
		s.sessionLine(se, slog.LevelWarn, "psk", "coap: PSK enrollment refused", "err", ratelog.ClipErr(err))
		return diag(codes.Forbidden, "%v", err)
	}
	return response{code: codes.Changed, format: message.AppJSON, body: body}
}
