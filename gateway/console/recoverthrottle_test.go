package console

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// recoverFrom posts a recovery from remote straight to h and returns the
// status.
func recoverFrom(h *Handler, remote, code, user, password string) int {
	r := httptest.NewRequest("POST", "/api/v1/recover", strings.NewReader(fmt.Sprintf(`{"code":%q,"user":%q,"password":%q}`, code, user, password)))
	r.Header.Set("Content-Type", "application/json")
	r.RemoteAddr = remote
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w.Code
}

// An owner who mistyped the password while a guesser held the account's
// lockout recovers the account from that address, and then logs in from
// it with the new password even when the guesser has locked the account
// again: the recovery code proves presence at the box, so the recovering
// address's failures go with the account's. They used to stay, and the
// account's lockout refused the owner's address for 24 h. The address's
// /64 keeps its failures: a guesser on the same prefix shares it.
func TestRecoveryForgetsTheRecoveringAddressFailures(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	setUpAdmin(t, srv)
	h.thr = newThrottle(DefaultThrottle, throttleKeys)
	const attacker, owner = "[fd00:1:2:66::1]:4000", "[fd00:1:2:3::7]:4000"
	lock := func(when string) {
		t.Helper()
		for i := 0; h.thr.LockedUntil(h.o.Now(), "u:root").IsZero(); i++ {
			if i == DefaultThrottle.FreeUser+1 {
				t.Fatalf("%s: root not locked out after %d guesses", when, i)
			}
			if code := login(h, attacker, "root", "wrong wrong wrong"); code != http.StatusUnauthorized {
				t.Fatalf("%s: guess %d: %d, want 401", when, i, code)
			}
		}
	}
	lock("before the recovery")
	if code := login(h, owner, "root", "a typo typo typo"); code != http.StatusUnauthorized {
		t.Fatalf("the owner's typo from a clean address: %d, want 401", code)
	}
	if code := login(h, owner, "root", oldPassword); code != http.StatusTooManyRequests {
		t.Fatalf("the owner's right password after a typo, root locked: %d, want 429", code)
	}
	rc, err := h.NewRecoveryCode()
	if err != nil {
		t.Fatal(err)
	}
	if code := recoverFrom(h, owner, rc, "root", newPassword); code != http.StatusOK {
		t.Fatalf("recovery from the owner's address: %d, want 200", code)
	}
	lock("after the recovery")
	if code := login(h, owner, "root", newPassword); code != http.StatusCreated {
		t.Errorf("the owner's new password from the address it recovered from, root locked again: %d, want 201", code)
	}
	if !h.thr.Failed(h.o.Now(), "p:fd00:1:2:3::/64") {
		t.Error("the recovery forgot the failures of the owner's /64, which a guesser on the prefix shares")
	}
}
