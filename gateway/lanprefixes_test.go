package gateway

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestConsoleServesLANPrefixes: the console serves a client on a global
// address inside a prefix of a lan interface's address (a dual-stack LAN's
// global IPv6, which the console's certificate names), and still refuses
// one outside every lan prefix; the prefixes follow the interface.
func TestConsoleServesLANPrefixes(t *testing.T) {
	lan := &fakeLAN{}
	lan.set(t, "lan0", "2001:db8:1:2::1/64", "192.0.2.7/24")
	r := startWithLAN(t, lan)
	h := r.g.consoleHandler
	if h == nil {
		t.Fatal("no console handler")
	}
	// served: any answer but the console's 403 for a source off the LAN
	// (a fresh gateway answers /login with the page or a redirect to setup).
	get := func(remote string) int {
		req := httptest.NewRequest(http.MethodGet, "/login", nil)
		req.RemoteAddr = remote
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusForbidden {
			return http.StatusOK
		}
		return w.Code
	}
	for remote, want := range map[string]int{
		"[2001:db8:1:2::99]:5555": http.StatusOK,
		"192.0.2.200:5555":        http.StatusOK,
		"[2001:db8:9::1]:5555":    http.StatusForbidden,
		"198.51.100.1:5555":       http.StatusForbidden,
	} {
		if got := get(remote); got != want {
			t.Errorf("GET /login from %s: %d, want %d", remote, got, want)
		}
	}
	lan.set(t, "lan0", "2001:db8:7::1/64")
	if got := get("[2001:db8:1:2::99]:5555"); got != http.StatusForbidden {
		t.Errorf("after lan0's prefix changed, GET /login from the old prefix: %d, want %d", got, http.StatusForbidden)
	}
	if got := get("[2001:db8:7::5]:5555"); got != http.StatusOK {
		t.Errorf("after lan0's prefix changed, GET /login from the new prefix: %d, want %d", got, http.StatusOK)
	}
}
