package coap

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// recordSink remembers what reached it.
type recordSink struct{ got []bridges.Message }

func (s *recordSink) Accept(_ context.Context, m bridges.Message) error {
	s.got = append(s.got, m)
	return nil
}

func testServer(t testing.TB, sink bridges.Sink) *Server {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	h, err := hub.New(sink, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{MaxPayload: 64}
	cfg.defaults()
	return &Server{cfg: cfg, hub: h, m: h.Metrics(), log: log, deadline: &hub.SharedDeadline{Timeout: acceptTimeout},
		lines: ratelog.New(refusalLogEvery), devLines: ratelog.New(refusalLogEvery)}
}

// addCaptures seeds f with the CoAP datagrams captured from libcoap's
// coap-client (testdata/captures).
func addCaptures(f *testing.F) {
	files, _ := filepath.Glob("testdata/captures/*.bin")
	if len(files) == 0 {
		f.Fatal("no seed captures in testdata/captures")
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// FuzzRequest feeds raw CoAP datagrams (seeded with messages captured from
// libcoap's coap-client, testdata/captures) through go-coap's decoder and
// our request parser and router, as device "dev1". Whatever the bytes, the
// router must answer, never panic, and never let telemetry leave
// devices/dev1/t/.
func FuzzRequest(f *testing.F) {
	addCaptures(f)
	sink := &recordSink{}
	s := testServer(f, sink)
	f.Fuzz(func(t *testing.T, data []byte) {
		sink.got = sink.got[:0]
		m := pool.NewMessage(context.Background())
		if _, err := m.UnmarshalWithDecoder(coder.DefaultCoder, data); err != nil {
			return
		}
		var res response
		r, err := parseRequest(m)
		if err != nil {
			res = diag(codes.BadRequest, "malformed")
		} else {
			res = s.route("dev1", r)
		}
		if res.code == 0 {
			t.Fatalf("no response code for %x", data)
		}
		for _, g := range sink.got {
			if !strings.HasPrefix(g.Topic, "devices/dev1/t/") || g.Device != "dev1" || len(g.Payload) > s.cfg.MaxPayload {
				t.Fatalf("telemetry escaped: %+v", g)
			}
		}
		if res.code == codes.Changed && len(sink.got) != 1 {
			t.Fatalf("2.04 without exactly one accepted message (%d)", len(sink.got))
		}
		if res.observe == obsRegister && !strings.HasPrefix(res.topic, "devices/dev1/c") {
			t.Fatalf("observe outside the namespace: %q", res.topic)
		}
	})
}

func TestCapturedRequests(t *testing.T) {
	for _, tc := range []struct {
		file  string
		want  codes.Code
		topic string
	}{
		{"post_telemetry", codes.Changed, "devices/dev1/t/room/temp"},
		{"post_json", codes.Changed, "devices/dev1/t/env"},
		{"post_noncon", codes.Changed, "devices/dev1/t/x"},
		{"get_wellknown", codes.Content, ""},
		{"observe_command", codes.Content, ""},
		{"put_command", codes.MethodNotAllowed, ""},
		{"delete", codes.MethodNotAllowed, ""},
		{"get_query", codes.Content, ""},
	} {
		b, err := os.ReadFile(filepath.Join("testdata/captures", tc.file+".bin"))
		if err != nil {
			t.Fatal(err)
		}
		sink := &recordSink{}
		s := testServer(t, sink)
		m := pool.NewMessage(context.Background())
		if _, err := m.UnmarshalWithDecoder(coder.DefaultCoder, b); err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		r, err := parseRequest(m)
		if err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		res := s.route("dev1", r)
		if res.code != tc.want {
			t.Errorf("%s: got %v, want %v (%s)", tc.file, res.code, tc.want, res.body)
		}
		if tc.topic != "" && (len(sink.got) != 1 || sink.got[0].Topic != tc.topic) {
			t.Errorf("%s: sink got %+v, want one message on %s", tc.file, sink.got, tc.topic)
		}
		if tc.file == "observe_command" && (res.observe != obsRegister || res.topic != "devices/dev1/c/led") {
			t.Errorf("observe: %+v", res)
		}
	}
}

// FuzzFirmwareResource: firmwareResource, which reads the Uri-Path options
// in place, names the same resource as the joined path did (the string
// comparisons serveFirmware made before). Segments are separated by NUL in
// the input, so that one may hold a '/'.
func FuzzFirmwareResource(f *testing.F) {
	for _, p := range []string{"fw-status", "fw\x00offer", "fw\x00sha256\x00" + strings.Repeat("ab", 32), "fw\x00acme\x00lamp",
		"fw", "fw\x00", "\x00fw", "t\x00x", "fw-status\x00x", "fw\x00offer\x00x", "fw/offer", "fw\x00a/b", "\xff", ".well-known\x00core"} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, in string) {
		var opts message.Options
		for _, seg := range strings.Split(in, "\x00") {
			opts = append(opts, message.Option{ID: message.URIPath, Value: []byte(seg)})
		}
		want := fwNone
		if p, err := opts.Path(); err == nil {
			p = strings.TrimPrefix(p, "/")
			switch {
			case p == fwStatusResource:
				want = fwStatus
			case p == fwOfferResource:
				want = fwOffer
			case p == "fw" || strings.HasPrefix(p, "fw/"):
				want = fwImage
			}
		}
		if got := firmwareResource(opts); got != want {
			t.Fatalf("options %q: resource %d, the joined path says %d", in, got, want)
		}
	})
}
