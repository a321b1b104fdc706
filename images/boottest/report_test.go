package boottest

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseReport(t *testing.T) {
	lines := []string{
		"noise before",
		"=== BEGIN iptables",
		"*filter",
		":INPUT DROP [0:0]",
		"=== END iptables rc=0",
		"[  OK  ] kernel line between sections",
		"=== BEGIN empty",
		"=== END empty rc=3",
		"=== REPORT DONE",
	}
	got, err := parseReport(lines)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]section{
		"iptables": {body: "*filter\n:INPUT DROP [0:0]", rc: 0},
		"empty":    {body: "", rc: 3},
	}
	if d := cmp.Diff(want, got, cmp.AllowUnexported(section{})); d != "" {
		t.Errorf("parseReport (-want +got):\n%s", d)
	}
	for _, bad := range [][]string{
		{"=== BEGIN a", "=== END b rc=0"},
		{"=== BEGIN a", "=== END a rc=x"},
		{"=== BEGIN a", "=== END a"},
	} {
		if _, err := parseReport(bad); err == nil {
			t.Errorf("parseReport(%q) accepted a malformed report", bad)
		}
	}
}
