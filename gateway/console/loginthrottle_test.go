package console

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
)

// A successful login lifts its source address's lockout but keeps the
// failures counted against it: a host with one account of its own that
// fails against other accounts is locked out at the source's count as if
// it had never logged in. The success used to erase the source's count,
// so logging in between failures kept it from ever being locked out.
func TestLoginSuccessKeepsSourceFailures(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	setUpAdmin(t, srv)
	h.thr = newThrottle(ThrottlePolicy{FreeUser: 100, FreeSource: 4, Base: time.Minute, Max: time.Hour, Forget: time.Hour}, throttleKeys)
	const src = "10.0.0.7:4000"
	for i := range 3 {
		clk.add(time.Second)
		if code := login(h, src, fmt.Sprintf("user%d", i), "wrong wrong wrong"); code != http.StatusUnauthorized {
			t.Fatalf("failure %d: %d, want 401", i, code)
		}
	}
	if code := login(h, src, "root", oldPassword); code != http.StatusCreated {
		t.Fatalf("the source's own account: %d, want 201", code)
	}
	if code := login(h, src, "user3", "wrong wrong wrong"); code != http.StatusUnauthorized {
		t.Fatalf("fourth failure: %d, want 401", code)
	}
	if code := login(h, src, "root", oldPassword); code != http.StatusTooManyRequests {
		t.Errorf("right password after the source's 4th failure: %d, want 429 (the success before erased its failures)", code)
	}
}

// hookGateway is a Gateway with Argon2Slots whose slot taking runs hook
// (if set): what another request does while a password is checked.
type hookGateway struct {
	stubGateway
	hook func()
}

func (g *hookGateway) AcquireArgon2(context.Context) error {
	if g.hook != nil {
		g.hook()
	}
	return nil
}

func (g *hookGateway) ReleaseArgon2() {}

// A successful login lifts a lockout of its source address that another
// request's failure set while the password was being checked.
func TestLoginSuccessLiftsSourceLockout(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	gw := &hookGateway{stubGateway: stubGateway{code: "ABCD-EFGH-JKLM-NPQR"}}
	clk := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	h, err := NewHandler(Options{Store: st, Gateway: gw, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	if w := serveJSON(h, "POST", "/api/v1/setup", fmt.Sprintf(`{"code":"ABCD-EFGH-JKLM-NPQR","user":"root","password":%q}`, oldPassword)); w.Code != http.StatusCreated {
		t.Fatalf("setup: %d %s", w.Code, w.Body)
	}
	gw.hook = func() { h.thr.Fail(clk.now(), "s:10.0.0.5", 1) }
	if w := serveJSON(h, "POST", "/api/v1/session", fmt.Sprintf(`{"user":"root","password":%q}`, oldPassword)); w.Code != http.StatusCreated {
		t.Fatalf("login: %d %s", w.Code, w.Body)
	}
	if until := h.thr.LockedUntil(clk.now(), "s:10.0.0.5"); !until.IsZero() {
		t.Errorf("the source is locked until %s after its successful login, want no lockout", until)
	}
}
