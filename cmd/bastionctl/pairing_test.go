package main

import (
	"strings"
	"testing"
)

// bastionctl registers setup codes; it has no way to open a window.
func TestPairingExpect(t *testing.T) {
	state := startGateway(t)
	out, errs, code := ctl(t, "--state", state, "--json", "pairing", "expect", "thermo", "--code", "ABCD-1234-EFGH")
	if code != 0 || !strings.Contains(out, `"name":"thermo"`) || strings.Contains(out, "ABCD") {
		t.Fatalf("pairing expect: exit %d, out %s, err %s (want the record, without the code)", code, out, errs)
	}
	if _, errs, code := ctl(t, "--state", state, "pairing", "expect", "thermo", "--code", "short"); code != 1 || !strings.Contains(errs, "8-64 characters") {
		t.Errorf("short code: exit %d %s, want 1 and the rule", code, errs)
	}
	for _, args := range [][]string{{"pairing", "open"}, {"pairing", "expect"}, {"pairing", "expect", "x"}} {
		if _, _, code := ctl(t, append([]string{"--state", state}, args...)...); code != 2 {
			t.Errorf("bastionctl %v: exit %d, want 2 (usage)", args, code)
		}
	}
}
