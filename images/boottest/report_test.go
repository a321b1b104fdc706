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

func TestCheckDefaultDeny(t *testing.T) {
	good := `*filter
:INPUT ACCEPT [0:0]
:BASTION-IN-1 - [0:0]
-A INPUT -m comment --comment "bastion:jump" -j BASTION-IN-1
-A BASTION-IN-1 -i eth0 -p tcp -m tcp --dport 443 -j ACCEPT
-A BASTION-IN-1 -m comment --comment "bastion:default-drop" -j DROP
COMMIT`
	if err := checkDefaultDeny(good); err != nil {
		t.Errorf("good ruleset refused: %v", err)
	}
	if err := checkDefaultDeny(":INPUT DROP [0:0]\n"); err != nil {
		t.Errorf("DROP policy refused: %v", err)
	}
	for name, bad := range map[string]string{
		"empty":            ":INPUT ACCEPT [0:0]\n",
		"conditional jump": ":INPUT ACCEPT [0:0]\n-A INPUT -i eth0 -j B\n-A B -j DROP\n",
		"no final drop":    ":INPUT ACCEPT [0:0]\n-A INPUT -j B\n-A B -p tcp --dport 1 -j DROP\n-A B -j ACCEPT\n",
		"conditional drop": ":INPUT ACCEPT [0:0]\n-A INPUT -j B\n-A B -i eth0 -j DROP\n",
	} {
		if err := checkDefaultDeny(bad); err == nil {
			t.Errorf("%s: accepted as default-deny", name)
		}
	}
}
