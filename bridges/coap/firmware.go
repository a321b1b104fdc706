package coap

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"unicode/utf8"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// Firmware is the verified firmware cache as the CoAP bridge uses it
// (*otacache.Cache implements it). The bridge only passes the device the
// DTLS session proved; the cache decides what that device may download.
type Firmware interface {
	ServeCoAP(w mux.ResponseWriter, r *mux.Message, device string)
	ServeCoAPStatus(w mux.ResponseWriter, r *mux.Message, device string)
	Offer(device string) (otacache.Offer, bool)
}

// Firmware resources. /fw/... is download-only (GET); the offer is the
// device's own command topic OfferPath, so one hub.Deliver of an offer
// reaches both a CoAP observer of /fw/offer and an MQTT subscriber.
const (
	fwOfferResource  = "fw/offer"
	fwStatusResource = "fw-status"
	// OfferPath is the command path (below devices/{id}/c/) offers are
	// delivered on.
	OfferPath = "fw/offer"
)

// OfferTopic is the MQTT topic (and hub command topic) of device's offers.
func OfferTopic(device string) string {
	return bridges.TopicPrefix(device) + hub.ClassCommand + "/" + OfferPath
}

// notifyFormat is the Content-Format of a notification on topic: offers
// are JSON, other commands opaque bytes.
func notifyFormat(topic string) message.MediaType {
	if strings.HasSuffix(topic, "/"+hub.ClassCommand+"/"+OfferPath) {
		return message.AppJSON
	}
	return message.AppOctets
}

// serveFirmware answers the firmware resources and reports whether the
// request was one of them. se is the request's authenticated session.
func (s *Server) serveFirmware(w *otacache.DTLSResponseWriter, m *pool.Message, se *session) bool {
	fw := s.cfg.Firmware
	if fw == nil {
		return false
	}
	res := firmwareResource(m.Options())
	if res == fwNone {
		return false
	}
	mm := &mux.Message{Message: m, RouteParams: new(mux.RouteParams)}
	switch res {
	case fwStatus:
		fw.ServeCoAPStatus(w, mm, se.device)
	case fwOffer:
		s.serveOffer(w, m, se)
	default:
		fw.ServeCoAP(w, mm, se.device)
	}
	return true
}

// The firmware resources (firmwareResource).
const (
	fwNone   = iota // not a firmware resource
	fwStatus        // fwStatusResource
	fwOffer         // fwOfferResource
	fwImage         // fw or below: an image
)

// firmwareResource tells which firmware resource the Uri-Path options
// name, looking at them in place (every request of a device session asks,
// telemetry too): the joined path "fw-status", "fw/offer", "fw" or below;
// a path that does not join (a segment with '/', not UTF-8) is none.
func firmwareResource(opts message.Options) int {
	var first, second []byte
	n := 0
	for _, o := range opts {
		if o.ID != message.URIPath {
			continue
		}
		if bytes.IndexByte(o.Value, '/') >= 0 || !utf8.Valid(o.Value) {
			return fwNone
		}
		switch n {
		case 0:
			first = o.Value
		case 1:
			second = o.Value
		}
		n++
	}
	switch {
	case n == 1 && string(first) == fwStatusResource:
		return fwStatus
	case n == 2 && string(first) == "fw" && string(second) == "offer":
		return fwOffer
	case n >= 1 && string(first) == "fw":
		return fwImage
	}
	return fwNone
}

// serveOffer answers GET /fw/offer: 2.05 with the current offer as JSON,
// or with an empty payload when there is none. With Observe: 0 the device
// is registered on its offer topic and gets each new offer as a
// notification.
func (s *Server) serveOffer(w *otacache.DTLSResponseWriter, m *pool.Message, se *session) {
	if m.Code() != codes.GET {
		_ = w.SetResponse(codes.MethodNotAllowed, message.TextPlain, strings.NewReader("/fw/offer allows GET (with Observe)"))
		return
	}
	var opts []message.Option
	var release func()
	if obs, err := m.Observe(); err == nil {
		switch obs {
		case 0:
			// Registered before the offer is read: an offer announced
			// meanwhile is in the answer or notified after it (perhaps
			// both), never in neither.
			seq, _, _, rel := se.observe(s, m.Token(), OfferTopic(se.device))
			if rel != nil { // else over the session's bound: a plain GET
				release = rel
				opts = append(opts, message.Option{ID: message.Observe, Value: encodeUint(seq)})
			}
		case 1:
			se.unobserve(m.Token())
		}
	}
	var body []byte
	if o, ok := s.cfg.Firmware.Offer(se.device); ok {
		body, _ = json.Marshal(o)
	}
	if err := w.SetResponse(codes.Content, message.AppJSON, bytes.NewReader(body), opts...); err != nil {
		s.log.Debug("coap: offer response not set", "device", se.device, "err", err)
	}
	if release != nil {
		afterAnswer(w, release)
	}
}

// serve runs one listener's sessions (otacache.ServeDTLS: each request is
// answered inline on pion's record reader, with no goroutine of ours per
// session, and a bounded response cache).
func (s *Server) serve(ctx context.Context, ln *limitListener) error {
	return otacache.ServeDTLS(ctx, ln, otacache.DTLSServeConfig{
		Handler: s.serveCoAP,
		// Big enough for every resource's body limit (bodyLimit), which
		// refuses a Block1 transfer as soon as it goes past it.
		MaxMessageSize: uint32(max(64*1024, 4*s.cfg.MaxPayload)),
		BodyLimit:      s.bodyLimit,
		OnTooLarge:     s.tooLarge,
		// A payload a little over the limit in one datagram still reaches
		// the handler (4.13 with Size1) instead of being dropped.
		ReadBufferSize:   max(1472, s.cfg.MaxPayload+128),
		HandshakeTimeout: s.cfg.HandshakeTimeout,
		IdleTimeout:      s.cfg.IdleTimeout,
		OnIdle: func(cc *otacache.DTLSConn) {
			s.log.Debug("coap: closing idle session", "device", s.deviceOf(cc), "idle", s.cfg.IdleTimeout)
			cc.Close()
		},
		OnNewConn: s.onNewConn,
		Inline:    s.inline,
		// Accept is EST's content negotiation (enroll.go). Nothing here
		// reads Uri-Query, If-Match, If-None-Match, Proxy-Uri or
		// Proxy-Scheme, so a request with one gets 4.02 instead of an
		// answer that ignored it.
		CriticalOptions: []message.OptionID{message.Accept},
		OnBadOption:     s.badOption,
		OnBadRequest:    s.badRequest,
		Errors:          func(err error) { s.log.Debug("coap: connection error", "err", err) },
	})
}

// bodyLimit is the largest request body a resource takes: the payload
// limit for telemetry (and anything without a body of its own), the CSR
// bound for the enrollment resources, and the status report's bound.
func (s *Server) bodyLimit(_ *otacache.DTLSConn, path string) uint32 {
	p := strings.TrimPrefix(path, "/")
	switch {
	case p == fwStatusResource:
		return otacache.MaxStatusReport
	case strings.HasPrefix(p, ".well-known/"):
		return maxEnrollBody
	}
	return uint32(s.cfg.MaxPayload)
}

// tooLarge logs and counts a request otacache refused for its size: with
// 4.13 (a Block1 transfer past bodyLimit, a confirmable datagram too large
// to read), or dropped (a non-confirmable one, or one that does not
// decode).
func (s *Server) tooLarge(cc *otacache.DTLSConn, path string, size uint64, limit uint32, answered bool) {
	if len(path) > 128 { // a datagram refused unread may name a long one
		path = strings.ToValidUTF8(path[:128], "") + "…"
	}
	msg := "coap: request refused: payload too large; answered 4.13 with the limit in Size1"
	if !answered {
		msg = "coap: request dropped: datagram too large to read, and non-confirmable or undecodable (no answer); send bodies over the limit in Block1 blocks"
	}
	s.sessionLine(s.sessionOf(cc), slog.LevelWarn, "too_large", msg, "path", path, "size", size, "limit", limit)
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonTooLarge).Inc()
}

// badRequest logs and counts a message otacache refused itself as bad: one
// that does not decode as CoAP, or a Block1 block out of order, shorter
// than its size or with a bad Block1 option.
func (s *Server) badRequest(cc *otacache.DTLSConn, path, answer, why string) {
	s.sessionLine(s.sessionOf(cc), slog.LevelInfo, "bad_request", "coap: request refused: "+why, "path", ratelog.Clip(path, ratelog.MaxText), "answer", answer)
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest).Inc()
}

// badOption logs and counts a request refused for a critical option the
// gateway does not process (otacache answers it 4.02, or drops a NON).
func (s *Server) badOption(cc *otacache.DTLSConn, confirmable bool, ids []message.OptionID) {
	answer := "4.02"
	if !confirmable {
		answer = "dropped (non-confirmable)"
	}
	s.sessionLine(s.sessionOf(cc), slog.LevelInfo, "bad_option:"+answer, "coap: request refused: unrecognised critical option", "options", fmt.Sprint(ids), "answer", answer)
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest).Inc()
}
