package console

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// connsServer is a console Server on 127.0.0.1:0 over real TLS, with an
// admin account whose session cookie is cookie, and the connections its
// listener closed for room counted by reason.
type connsServer struct {
	addr   string
	tls    *tls.Config // the client's
	cookie string      // "__Host-bastion_session=..."
	st     *store.Store

	mu      sync.Mutex
	refused map[string]int
}

func (s *connsServer) count(reason string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refused[reason]
}

func startConnsServer(t *testing.T) *connsServer {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	h, err := NewHandler(Options{Store: st, Gateway: stubGateway{code: "ABCD-EFGH-JKLM-NPQR"}})
	if err != nil {
		t.Fatal(err)
	}
	ca := testpki.New(t, dir, "console-test")
	leaf := ca.Server(t, "console", "127.0.0.1")
	s := &connsServer{tls: &tls.Config{RootCAs: ca.Pool(), ServerName: "127.0.0.1"}, refused: map[string]int{}, st: st}
	refused := func(_ slog.Level, _, reason, _ string, _ ...any) {
		s.mu.Lock()
		s.refused[reason]++
		s.mu.Unlock()
	}
	srv, err := New("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{leaf.TLS}}, h, slog.New(slog.DiscardHandler), nil, refused)
	if err != nil {
		t.Fatal(err)
	}
	s.addr = srv.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("console Run: %v", err)
		}
	})

	s.cookie = setupAdmin(t, h)
	return s
}

// setupAdmin creates the first admin through h (in memory: no connection
// to count) and returns its session cookie, "name=value".
func setupAdmin(t *testing.T, h *Handler) string {
	t.Helper()
	r := httptest.NewRequest("POST", "https://127.0.0.1/api/v1/setup",
		strings.NewReader(`{"code":"abcd-efgh-jklm-npqr","user":"root","password":"correct horse battery staple"}`))
	r.RemoteAddr = "127.0.0.1:1234"
	r.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	for _, ck := range w.Result().Cookies() {
		if ck.Name == sessionCookie && ck.Value != "" {
			return ck.Name + "=" + ck.Value
		}
	}
	t.Fatalf("setup: %d %s; want 201 and a session cookie", w.Code, w.Body)
	return ""
}

// connsClient is one TLS connection to the console, kept open for more
// requests.
type connsClient struct {
	c *tls.Conn
	r *bufio.Reader
}

// dial opens a connection from the loopback address from and completes
// its TLS handshake.
func (s *connsServer) dial(from string) (*connsClient, error) {
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	raw, err := d.Dial("tcp", s.addr)
	if err != nil {
		return nil, err
	}
	c := tls.Client(raw, s.tls)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	return &connsClient{c: c, r: bufio.NewReader(c)}, nil
}

func (c *connsClient) Close() error { return c.c.Close() }

// do sends the raw request req and reads its answer.
func (c *connsClient) do(req string) (*http.Response, error) {
	c.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c.c, req); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		return nil, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp, err
}

// get GETs path on c, with the session cookie if one is given, and
// returns the status.
func (c *connsClient) get(path, cookie string) (int, error) {
	req := "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
	if cookie != "" {
		req += "Cookie: " + cookie + "\r\n"
	}
	resp, err := c.do(req + "\r\n")
	if err != nil {
		return 0, err
	}
	return resp.StatusCode, nil
}

// flood opens a connection from from and asks for the login page on it,
// as a LAN host holding connections open does; nil if the console closed
// it first.
func (s *connsServer) flood(t *testing.T, from string) *connsClient {
	t.Helper()
	c, err := s.dial(from)
	if err != nil {
		return nil
	}
	t.Cleanup(func() { c.Close() })
	if code, err := c.get("/login", ""); err != nil || code != http.StatusOK {
		c.Close()
		return nil
	}
	return c
}

// signedIn opens a connection from from and asks for /api/v1/session on
// it with the admin's session cookie: an administrator's browser.
func (s *connsServer) signedIn(t *testing.T, from string) (*connsClient, error) {
	t.Helper()
	c, err := s.dial(from)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	code, err := c.get("/api/v1/session", s.cookie)
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("GET /api/v1/session with the session cookie: %d, want 200", code)
	}
	return c, nil
}

// isClosed reports whether the console closed c, which has no request
// pending: a read ends, and not by its 10 s deadline.
func isClosed(c *connsClient) bool {
	c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.r.ReadByte()
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// TestConsoleConnsPerAddress: a LAN host that opens connections to the
// console and keeps them (each having asked for the login page) keeps at
// most maxNotSignedInPerAddr; each one more is closed at once and counted
// as handshake_limit, and an administrator from another address gets in.
// Before, it kept every one for the IdleTimeout (and longer with one more
// request), as many as it could open: the gateway's memory and file
// descriptors.
func TestConsoleConnsPerAddress(t *testing.T) {
	s := startConnsServer(t)
	const more = 12
	var held []*connsClient
	for i := range maxNotSignedInPerAddr + more {
		c := s.flood(t, "127.0.0.2")
		if (c != nil) != (i < maxNotSignedInPerAddr) {
			t.Fatalf("connection %d from one address: open %v, want %v (at most %d)", i+1, c != nil, i < maxNotSignedInPerAddr, maxNotSignedInPerAddr)
		}
		if c != nil {
			held = append(held, c)
		}
	}
	if got := s.count("handshake_limit"); got != more {
		t.Errorf("handshake_limit refusals = %d, want %d", got, more)
	}
	// Those kept are still served.
	for i, c := range held {
		if code, err := c.get("/login", ""); err != nil || code != http.StatusOK {
			t.Errorf("kept connection %d: %d, %v; want 200", i+1, code, err)
		}
	}
	if _, err := s.signedIn(t, "127.0.0.3"); err != nil {
		t.Errorf("an administrator from another address: %v", err)
	}
}

// TestConsoleConnsInAll: hosts that each stay within their address's
// bound hold at most maxNotSignedIn connections not signed in together:
// past it each new one closes the oldest (handshake_limit).
func TestConsoleConnsInAll(t *testing.T) {
	s := startConnsServer(t)
	const hosts = 6
	var conns []*connsClient
	for i := range hosts * maxNotSignedInPerAddr {
		from := fmt.Sprintf("127.0.1.%d", 1+i/maxNotSignedInPerAddr)
		c := s.flood(t, from)
		if c == nil {
			t.Fatalf("connection %d (from %s, within its bound) closed; want it served", i+1, from)
		}
		conns = append(conns, c)
	}
	over := len(conns) - maxNotSignedIn
	if got := s.count("handshake_limit"); got != over {
		t.Errorf("handshake_limit refusals = %d, want %d", got, over)
	}
	for i, c := range conns[:over] {
		if !isClosed(c) {
			t.Errorf("connection %d of %d: open, want closed (the oldest %d closed)", i+1, len(conns), over)
			break // each open one takes 10 s to tell
		}
	}
	for i, c := range conns[over:] {
		if code, err := c.get("/login", ""); err != nil || code != http.StatusOK {
			t.Errorf("connection %d of %d: %d, %v; want 200 (the newest %d kept)", over+i+1, len(conns), code, err, maxNotSignedIn)
		}
	}
}

// TestConsoleConnsSignedInKept: with every place taken, an administrator
// whose browser has a session gets in, closing the oldest connection of
// the flood, and the connections a valid session was seen on stay open
// however long the flood goes on: the flood pushes out its own. Before
// connections were bounded there was no flood to push out, only the
// gateway's memory; a bound that refused the newcomer when full would
// keep the administrator out, and one that closed the oldest whatever it
// was would close the administrator's.
func TestConsoleConnsSignedInKept(t *testing.T) {
	s := startConnsServer(t)
	// More signed-in connections than half of the places (administrators'
	// browsers on a few hosts, each within what one address may have
	// not signed in), so that the flood fills the rest: every place
	// taken.
	const admin = maxConns - maxNotSignedIn + 8
	var admins []*connsClient
	for i := range admin {
		c, err := s.signedIn(t, fmt.Sprintf("127.0.0.%d", 1+i/maxNotSignedInPerAddr))
		if err != nil {
			t.Fatalf("signed-in connection %d: %v", i+1, err)
		}
		admins = append(admins, c)
	}
	floodFrom := func(first int) {
		for i := range maxNotSignedIn {
			s.flood(t, fmt.Sprintf("127.0.1.%d", first+i/maxNotSignedInPerAddr))
		}
	}
	floodFrom(1)
	pushed := admin + maxNotSignedIn - maxConns
	if got := s.count("handshake_limit"); got != pushed {
		t.Errorf("after the flood filled the places: handshake_limit = %d, want %d (the oldest of the flood pushed out)", got, pushed)
	}
	c, err := s.signedIn(t, "127.0.0.1")
	if err != nil {
		t.Fatalf("an administrator while the flood holds every place: %v; want in", err)
	}
	admins = append(admins, c)
	floodFrom(1 + maxNotSignedIn/maxNotSignedInPerAddr)
	for i, c := range admins {
		if code, err := c.get("/api/v1/session", s.cookie); err != nil || code != http.StatusOK {
			t.Errorf("signed-in connection %d after the flood: %d, %v; want 200 (kept)", i+1, code, err)
		}
	}
	if got, want := s.count("handshake_limit"), pushed+1+maxNotSignedIn; got != want {
		t.Errorf("handshake_limit = %d, want %d", got, want)
	}
	if got := s.count("conn_limit"); got != 0 {
		t.Errorf("conn_limit = %d, want 0 (there was always a flood connection to close)", got)
	}
}

// TestConsoleConnsAllSignedIn: the console holds at most maxConns
// connections in all; with every one signed in (from addresses each
// within maxSignedInPerAddr), a new one is closed at once (conn_limit).
func TestConsoleConnsAllSignedIn(t *testing.T) {
	s := startConnsServer(t)
	for i := range maxConns {
		if _, err := s.signedIn(t, fmt.Sprintf("127.0.0.%d", 1+i/maxSignedInPerAddr)); err != nil {
			t.Fatalf("signed-in connection %d: %v", i+1, err)
		}
	}
	if _, err := s.signedIn(t, "127.0.0.1"); err == nil {
		t.Errorf("connection %d, every place taken by signed-in ones: served, want closed", maxConns+1)
	}
	if got := s.count("conn_limit"); got != 1 {
		t.Errorf("conn_limit = %d, want 1", got)
	}
}

// TestConsoleSignedInOnlyBySession: only a request the console would
// serve as someone signs its connection in: with a valid session, from
// the LAN.
func TestConsoleSignedInOnlyBySession(t *testing.T) {
	h, _, _ := newTestHandler(t)
	cookie := setupAdmin(t, h)
	for _, tc := range []struct {
		name, remote, cookie string
		want                 bool
	}{
		{"valid session", "127.0.0.1:1234", cookie, true},
		{"no session", "127.0.0.1:1234", "", false},
		{"made-up session", "127.0.0.1:1234", sessionCookie + "=" + strings.Repeat("A", 43), false},
		{"valid session from outside the LAN", "192.0.2.1:1234", cookie, false},
	} {
		r := httptest.NewRequest("GET", "https://127.0.0.1/", nil)
		r.RemoteAddr = tc.remote
		if tc.cookie != "" {
			r.Header.Set("Cookie", tc.cookie)
		}
		if got := h.signedIn(r) == signInYes; got != tc.want {
			t.Errorf("%s: signed in %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestConsoleConnsSignedInPerAddr: one address with a valid session (any
// account's) signs in at most maxSignedInPerAddr connections; past it they
// count as not signed in, so that address holds at most
// maxSignedInPerAddr+maxNotSignedInPerAddr in all, and an administrator
// from another address gets in. Before, every connection a session was
// seen on was claimed: one address took all maxConns places, kept them
// with a request each per idle timeout, and every newcomer was closed
// (conn_limit).
func TestConsoleConnsSignedInPerAddr(t *testing.T) {
	s := startConnsServer(t)
	const held = maxSignedInPerAddr + maxNotSignedInPerAddr
	served := 0
	for i := range maxConns {
		if _, err := s.signedIn(t, "127.0.0.2"); err == nil {
			served++
		} else if i < held {
			t.Fatalf("signed-in connection %d from one address: %v; want served (at most %d)", i+1, err, held)
		}
	}
	if served != held {
		t.Errorf("connections with a session kept from one address = %d, want %d (%d signed in, %d not)", served, held, maxSignedInPerAddr, maxNotSignedInPerAddr)
	}
	c, err := s.signedIn(t, "127.0.0.3")
	if err != nil {
		t.Fatalf("an administrator from another address: %v; want in", err)
	}
	if code, err := c.get("/api/v1/session", s.cookie); err != nil || code != http.StatusOK {
		t.Errorf("administrator's connection: %d, %v; want 200", code, err)
	}
	if got := s.count("conn_limit"); got != 0 {
		t.Errorf("conn_limit = %d, want 0", got)
	}
}

// TestConsoleConnsUnclaimedOnSessionEnd: once a session ends, a request
// with it on a signed-in connection makes that connection not signed in
// again: of one address's maxSignedInPerAddr, maxNotSignedInPerAddr stay
// (not signed in, so they can be pushed out) and the rest are closed
// after their answer. Before, a connection stayed claimed for good:
// logging out, or deleting the account or token, left its places taken.
func TestConsoleConnsUnclaimedOnSessionEnd(t *testing.T) {
	s := startConnsServer(t)
	var conns []*connsClient
	for i := range maxSignedInPerAddr {
		c, err := s.signedIn(t, "127.0.0.2")
		if err != nil {
			t.Fatalf("signed-in connection %d: %v", i+1, err)
		}
		conns = append(conns, c)
	}
	_, value, _ := strings.Cut(s.cookie, "=")
	if err := s.st.DeleteSession(hashToken(value)); err != nil {
		t.Fatal(err)
	}
	closing := 0
	for i, c := range conns {
		resp, err := c.do("GET /api/v1/session HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: " + s.cookie + "\r\n\r\n")
		if err != nil {
			t.Fatalf("connection %d, session ended: %v", i+1, err)
		}
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("connection %d, session ended: %d, want 401", i+1, resp.StatusCode)
		}
		if resp.Close {
			closing++
			if !isClosed(c) {
				t.Errorf("connection %d: answered with Connection: close but left open", i+1)
			}
		}
	}
	if want := maxSignedInPerAddr - maxNotSignedInPerAddr; closing != want {
		t.Errorf("connections closed after their session ended = %d, want %d (the address keeps %d not signed in)", closing, want, maxNotSignedInPerAddr)
	}
}
