package console_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// box is a real gateway started by a test, console on 127.0.0.1:0.
type box struct {
	g    *gateway.Gateway
	base string // https://127.0.0.1:port
	code string // the one-time setup code bastiond printed
	dir  string
}

var setupCodeRE = regexp.MustCompile(`setup code: ([A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4})`)

func startBox(t *testing.T) *box {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	c := config.Dev(dir)
	c.CoAP.Listen, c.CoAP.PSKListen = "127.0.0.1:0", "127.0.0.1:0"
	c.MQTT.Listen, c.Console.Listen = "127.0.0.1:0", "127.0.0.1:0"
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := gateway.WriteConfigFile(filepath.Join(dir, "bastion.yaml"), c); err != nil {
		t.Fatal(err)
	}
	out := &bytes.Buffer{}
	ready := make(chan struct{})
	g, err := gateway.New(gateway.Options{Dev: true, StateDir: dir, Log: slog.New(slog.DiscardHandler), Out: out,
		Ready: func(*gateway.Gateway) { close(ready) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("gateway stopped at start: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("gateway not ready within 10s")
	}
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("gateway Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("gateway did not stop within 10s")
		}
	})
	m := setupCodeRE.FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("no setup code in bastiond's start-up output:\n%s", out)
	}
	return &box{g: g, base: "https://" + g.Addrs()["console"], code: m[1], dir: dir}
}

// client trusts only the gateway's root and keeps cookies.
func (b *box) client(t *testing.T) *http.Client {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: b.g.CA().RootPool(), MinVersion: tls.VersionTLS12}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Jar: jar, Transport: tr, Timeout: 20 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

type resp struct {
	code int
	body string
	hdr  http.Header
}

func (r resp) json(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(r.body), v); err != nil {
		t.Fatalf("decode %q: %v", r.body, err)
	}
}

// do sends one request; body is JSON unless it is url.Values (a form).
func (b *box) do(t *testing.T, c *http.Client, method, path string, body any, hdr map[string]string) resp {
	t.Helper()
	var rd io.Reader
	ct := ""
	switch v := body.(type) {
	case nil:
	case url.Values:
		rd, ct = strings.NewReader(v.Encode()), "application/x-www-form-urlencoded"
	case string:
		rd, ct = strings.NewReader(v), "application/json"
	default:
		j, _ := json.Marshal(v)
		rd, ct = bytes.NewReader(j), "application/json"
	}
	req, err := http.NewRequest(method, b.base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if ct != "" {
		req.Header.Set("Content-Type", ct)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	return resp{code: res.StatusCode, body: string(data), hdr: res.Header}
}

const goodPassword = "correct horse battery staple"

// setupAdmin creates the first admin over the API and returns a logged-in
// client and its CSRF token.
func (b *box) setupAdmin(t *testing.T, user string) (*http.Client, string) {
	t.Helper()
	c := b.client(t)
	r := b.do(t, c, "POST", "/api/v1/setup", map[string]string{"code": b.code, "user": user, "password": goodPassword}, nil)
	if r.code != http.StatusCreated {
		t.Fatalf("setup: %d %s", r.code, r.body)
	}
	var s struct {
		CSRF string `json:"csrf_token"`
	}
	r.json(t, &s)
	return c, s.CSRF
}

// login returns a new logged-in client and its CSRF token.
func (b *box) login(t *testing.T, user, password string) (*http.Client, string) {
	t.Helper()
	c := b.client(t)
	r := b.do(t, c, "POST", "/api/v1/session", map[string]string{"user": user, "password": password}, nil)
	if r.code != http.StatusCreated {
		t.Fatalf("login %s: %d %s", user, r.code, r.body)
	}
	var s struct {
		CSRF string `json:"csrf_token"`
	}
	r.json(t, &s)
	return c, s.CSRF
}

func csrf(tok string) map[string]string { return map[string]string{"X-CSRF-Token": tok} }
