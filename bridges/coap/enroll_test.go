package coap

import (
	"bytes"
	"context"
	"crypto/x509"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/pki/est"
)

// fakeEnroll records what reached the gateway's enrollment service.
type fakeEnroll struct{ calls []string }

func (f *fakeEnroll) Kind(device string) Kind { return KindNone }

func (f *fakeEnroll) PAKE(_ context.Context, device string, msg []byte) ([]byte, error) {
	f.calls = append(f.calls, "pake")
	return []byte{1}, nil
}

func (f *fakeEnroll) EnrollPSK(_ context.Context, device string) ([]byte, error) {
	f.calls = append(f.calls, "psk")
	return []byte("{}"), nil
}

func (f *fakeEnroll) EST(_ context.Context, device string, kind Kind, _ []*x509.Certificate, r est.Request) est.Response {
	f.calls = append(f.calls, "est "+r.Path)
	return est.Response{Code: est.Changed, ContentFormat: est.FormatPKIXCert, Payload: []byte{2}}
}

// encode builds a datagram with go-coap's own encoder.
func encode(t testing.TB, code codes.Code, path string, format int, body []byte) []byte {
	m := pool.NewMessage(context.Background())
	m.SetCode(code)
	m.SetType(message.Confirmable)
	m.SetMessageID(7)
	m.SetToken([]byte{1, 2})
	if err := m.SetPath(path); err != nil {
		t.Fatal(err)
	}
	if format >= 0 {
		m.SetContentFormat(message.MediaType(format))
	}
	if body != nil {
		m.SetBody(bytes.NewReader(body))
	}
	b, err := m.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func routeDatagram(t testing.TB, s *Server, kind Kind, data []byte) (response, bool) {
	m := pool.NewMessage(context.Background())
	if _, err := m.UnmarshalWithDecoder(coder.DefaultCoder, data); err != nil {
		return response{}, false
	}
	r, err := parseRequest(m)
	if err != nil {
		return response{}, false
	}
	se := &session{device: "dev1", enroll: enrollInfo{kind: kind}}
	return s.routeSession(context.Background(), m, se, r), true
}

func TestRouteSessionKinds(t *testing.T) {
	sen := encode(t, codes.POST, est.PathSen, est.FormatPKCS10, []byte{0x30})
	crts := encode(t, codes.GET, est.PathCrts, -1, nil)
	sren := encode(t, codes.POST, est.PathSren, est.FormatPKCS10, []byte{0x30})
	pake := encode(t, codes.POST, PAKEPath, int(message.AppOctets), []byte{1, 1})
	tele := encode(t, codes.POST, "/t/temp", int(message.TextPlain), []byte("21"))
	psk := encode(t, codes.POST, PSKPath, -1, nil)
	for _, tc := range []struct {
		name  string
		kind  Kind
		data  []byte
		code  codes.Code
		calls []string
		sink  int
	}{
		{"pake reaches pake", KindPAKE, pake, codes.Changed, []string{"pake"}, 0},
		{"pake not telemetry", KindPAKE, tele, codes.Forbidden, nil, 0},
		{"pake not sen", KindPAKE, sen, codes.Forbidden, nil, 0},
		{"pake not crts", KindPAKE, crts, codes.Forbidden, nil, 0},
		{"enroll reaches sen", KindEnroll, sen, codes.Changed, []string{"est " + est.PathSen}, 0},
		{"enroll reaches crts", KindEnroll, crts, codes.Changed, []string{"est " + est.PathCrts}, 0},
		{"enroll not sren", KindEnroll, sren, codes.Forbidden, nil, 0},
		{"enroll not pake", KindEnroll, pake, codes.Forbidden, nil, 0},
		{"enroll not telemetry", KindEnroll, tele, codes.Forbidden, nil, 0},
		{"enroll reaches psk", KindEnroll, psk, codes.Changed, []string{"psk"}, 0},
		{"pake not psk", KindPAKE, psk, codes.Forbidden, nil, 0},
		{"device not psk", KindDevice, psk, codes.NotFound, nil, 0},
		{"device not sen", KindDevice, sen, codes.Forbidden, nil, 0},
		{"device not pake", KindDevice, pake, codes.NotFound, nil, 0},
		{"device sren", KindDevice, sren, codes.Changed, []string{"est " + est.PathSren}, 0},
		{"device crts", KindDevice, crts, codes.Changed, []string{"est " + est.PathCrts}, 0},
		{"device telemetry", KindDevice, tele, codes.Changed, nil, 1},
		{"none nothing", KindNone, tele, codes.Forbidden, nil, 0},
		{"none no crts", KindNone, crts, codes.Forbidden, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sink := &recordSink{}
			s := testServer(t, sink)
			fe := &fakeEnroll{}
			s.cfg.Enroll = fe
			res, ok := routeDatagram(t, s, tc.kind, tc.data)
			if !ok {
				t.Fatal("datagram did not decode")
			}
			if res.code != tc.code {
				t.Errorf("code = %v, want %v (%s)", res.code, tc.code, res.body)
			}
			if diff := cmp.Diff(tc.calls, fe.calls); diff != "" {
				t.Errorf("enrollment calls (-want +got):\n%s", diff)
			}
			if len(sink.got) != tc.sink {
				t.Errorf("telemetry accepted %d, want %d", len(sink.got), tc.sink)
			}
		})
	}
	// Without an enrollment service, EST resources do not exist.
	s := testServer(t, &recordSink{})
	if res, _ := routeDatagram(t, s, KindDevice, crts); res.code != codes.NotFound {
		t.Errorf("crts with no enrollment service = %v, want 4.04", res.code)
	}
}

// FuzzRouteSession feeds datagrams (libcoap captures and go-coap encodings
// of the enrollment requests) to the session router under every kind: a
// PAKE session reaches only the PAKE resource, an enrollment session only
// /sen and /crts, an operational session never /sen or the PAKE, and only
// operational sessions reach telemetry.
func FuzzRouteSession(f *testing.F) {
	files, _ := filepath.Glob("testdata/captures/*.bin")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(byte(KindDevice), b)
	}
	for k := KindDevice; k <= KindNone; k++ {
		f.Add(byte(k), encode(f, codes.POST, est.PathSen, est.FormatPKCS10, []byte{0x30, 0x03, 1, 2, 3}))
		f.Add(byte(k), encode(f, codes.GET, est.PathCrts, -1, nil))
		f.Add(byte(k), encode(f, codes.POST, PAKEPath, int(message.AppOctets), []byte{1, 1, 0, 2, 'i', 'd', 0, 0, 0, 0}))
		f.Add(byte(k), encode(f, codes.POST, "/t/x", -1, []byte("1")))
		f.Add(byte(k), encode(f, codes.POST, PSKPath, -1, nil))
	}
	f.Fuzz(func(t *testing.T, k byte, data []byte) {
		kind := Kind(k % 4)
		sink := &recordSink{}
		s := testServer(t, sink)
		fe := &fakeEnroll{}
		s.cfg.Enroll = fe
		res, ok := routeDatagram(t, s, kind, data)
		if !ok {
			return
		}
		if res.code == 0 {
			t.Fatal("no response code")
		}
		if kind != KindDevice && len(sink.got) > 0 {
			t.Fatalf("%v session reached telemetry", kind)
		}
		for _, c := range fe.calls {
			ok := false
			switch kind {
			case KindPAKE:
				ok = c == "pake"
			case KindEnroll:
				ok = c == "est "+est.PathSen || c == "est "+est.PathCrts || c == "psk"
			case KindDevice:
				ok = c == "est "+est.PathCrts || c == "est "+est.PathSren
			}
			if !ok {
				t.Fatalf("%v session reached %q", kind, c)
			}
		}
	})
}

// sessionLine spaces the refusal lines of a session by who can cause
// them: in an enrollment session (KindPAKE, KindEnroll), whose peer may be
// anyone (the PAKE's PSK is public) under any identity, one line per kind
// per interval whatever the identity, which is cut (ratelog.MaxText); in
// an operational session, one per kind and device, so that one device's
// refusals do not hide another's.
func TestSessionLine(t *testing.T) {
	lines := &LogLines{}
	s := &Server{log: slog.New(lines), lines: ratelog.New(refusalLogEvery), devLines: ratelog.New(refusalLogEvery)}
	long := "pake:" + strings.Repeat("x", 1000)
	sessions := map[string]*session{
		"pake-long": {device: long, enroll: enrollInfo{kind: KindPAKE}},
		"pake-b":    {device: "pake:b", enroll: enrollInfo{kind: KindPAKE}},
		"enroll-c":  {device: "enroll:c", enroll: enrollInfo{kind: KindEnroll}},
		"dev-a":     {device: "dev-a", enroll: enrollInfo{kind: KindDevice}},
		"dev-b":     {device: "dev-b", enroll: enrollInfo{kind: KindDevice}},
	}
	for _, c := range []struct{ session, kind, msg string }{
		{"pake-long", "pake", "coap: pairing exchange refused"},
		{"pake-b", "pake", "coap: pairing exchange refused"}, // another identity, same kind: not logged
		{"enroll-c", "pake", "coap: pairing exchange refused"},
		{"enroll-c", "est", "coap: EST request refused"}, // another kind: logged
		{"enroll-c", "est", "coap: EST request refused"},
		{"dev-a", "est", "coap: EST request refused"}, // an operational session's: per device
		{"dev-a", "est", "coap: EST request refused"},
		{"dev-b", "est", "coap: EST request refused"},
	} {
		s.sessionLine(sessions[c.session], slog.LevelWarn, c.kind, c.msg, "err", "refused for "+c.session)
	}
	type line struct{ Device, Err, NotLogged string }
	got := func(msg string) (l []line) {
		for _, a := range lines.Attrs(msg) {
			l = append(l, line{a["device"], a["err"], a["not_logged_since_last_line"]})
		}
		return l
	}
	clipped := ratelog.Clip(long, ratelog.MaxText)
	if len(clipped) > ratelog.MaxText+32 {
		t.Fatalf("clipped identity is %d bytes", len(clipped))
	}
	// Both say how many were not logged (0 for the first).
	if diff := cmp.Diff([]line{{clipped, "refused for pake-long", "0"}}, got("coap: pairing exchange refused")); diff != "" {
		t.Errorf("pairing exchange lines (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]line{{"enroll:c", "refused for enroll-c", "0"}, {"dev-a", "refused for dev-a", "0"}, {"dev-b", "refused for dev-b", "0"}},
		got("coap: EST request refused")); diff != "" {
		t.Errorf("EST lines (-want +got):\n%s", diff)
	}
	// The next interval's line of a kind says how many of it were not
	// logged: the two pake refusals after the first, from other identities.
	if n, ok := s.lines.Allow("enroll:pake", time.Now().Add(refusalLogEvery)); !ok || n != 2 {
		t.Errorf("a whole interval later, enroll:pake: let through %v, %d not logged before; want true, 2", ok, n)
	}
}
