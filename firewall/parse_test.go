package firewall

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSplitArgsRoundTrip(t *testing.T) {
	cases := [][]string{
		{"-m", "comment", "--comment", "bastion:jump", "-j", "X"},
		{"--log-prefix", "bastion drop in: "},
		{"--comment", `a "quoted" \ comment`},
		{"--comment", ""},
		{"--comment", "it's #1"},
	}
	for _, args := range cases {
		got, err := splitArgs(quoteArgs(args))
		if err != nil {
			t.Fatalf("splitArgs(%q): %v", quoteArgs(args), err)
		}
		if diff := cmp.Diff(args, got); diff != "" {
			t.Errorf("round trip of %q (-want +got):\n%s", quoteArgs(args), diff)
		}
	}
}

func TestParseRuleLine(t *testing.T) {
	cases := []struct {
		line    string
		chain   string
		want    LiveRule
		wantErr string
	}{
		{line: `-A INPUT -m comment --comment "bastion:jump" -c 12 3400 -j BASTION-IN-1`, chain: "INPUT",
			want: LiveRule{Rule: Rule{"-m", "comment", "--comment", "bastion:jump", "-j", "BASTION-IN-1"}, Packets: 12, Bytes: 3400}},
		{line: `-A X -c 1 2 -j DROP`, chain: "X", want: LiveRule{Rule: Rule{"-j", "DROP"}, Packets: 1, Bytes: 2}},
		{line: `-A X -j LOG --log-prefix "a b: "`, chain: "X", want: LiveRule{Rule: Rule{"-j", "LOG", "--log-prefix", "a b: "}}},
		{line: `-A X --comment "-c" -c 5 6 -j DROP`, chain: "X", want: LiveRule{Rule: Rule{"--comment", "-c", "-j", "DROP"}, Packets: 5, Bytes: 6}},
		{line: `-A X -c a b -j DROP`, chain: "X", want: LiveRule{Rule: Rule{"-c", "a", "b", "-j", "DROP"}}},
		{line: `-N X`, wantErr: `want "-A <chain> ..."`},
		{line: `-A X --comment "open`, wantErr: "unterminated quote"},
		{line: `-A`, wantErr: `want "-A <chain> ..."`},
		{line: "-A X \x00", wantErr: "control character"},
	}
	for _, c := range cases {
		chain, got, err := parseRuleLine(c.line)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("parseRuleLine(%q) error = %v, want %q", c.line, err, c.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("parseRuleLine(%q): %v", c.line, err)
			continue
		}
		if chain != c.chain {
			t.Errorf("parseRuleLine(%q) chain = %q, want %q", c.line, chain, c.chain)
		}
		if diff := cmp.Diff(c.want, got); diff != "" {
			t.Errorf("parseRuleLine(%q) (-want +got):\n%s", c.line, diff)
		}
	}
}

func TestParseTableRealCapture(t *testing.T) {
	// Captured with `iptables -t filter -v -S` after applying a policy.
	raw, err := os.ReadFile(filepath.Join("testdata", "snapshot.v4-extra.txt"))
	if err != nil {
		t.Fatal(err)
	}
	tb, err := parseTable(string(raw))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(tb.Chains[:3], []string{"INPUT", "FORWARD", "OUTPUT"}) || len(tb.Chains) != 5 {
		t.Errorf("chains = %v", tb.Chains)
	}
	in := tb.Rules["INPUT"]
	if len(in) != 1 || !strings.HasPrefix(in[0].Rule.Target(), "BASTION-IN-") || in[0].Rule.Label() != "jump" {
		t.Errorf("INPUT = %+v", in)
	}
	out := tb.Rules["OUTPUT"]
	if len(out) != 1 || out[0].Rule.Label() != `a "quoted" \ comment` {
		t.Errorf("OUTPUT = %+v", out)
	}
	for _, bad := range []string{"-A INPUT -j DROP\n", "-P INPUT ACCEPT\n-P INPUT ACCEPT\n", "garbage\n", "-N\n"} {
		if _, err := parseTable(bad); err == nil {
			t.Errorf("parseTable(%q) accepted", bad)
		}
	}
}

func TestRestoreScriptRefusesInjection(t *testing.T) {
	for _, ops := range [][]Op{
		{{Kind: OpAppend, Chain: "X", Rule: Rule{"--comment", "x\n-F INPUT"}}},
		{{Kind: OpFlush, Chain: "X\nCOMMIT"}},
		{{Kind: OpFlush, Chain: "-X"}},
		{{Kind: OpFlush, Chain: ""}},
	} {
		if s, err := restoreScript(ops); err == nil {
			t.Errorf("restoreScript(%+v) accepted:\n%s", ops, s)
		}
	}
	s, err := restoreScript([]Op{
		{Kind: OpNewChain, Chain: "B"},
		{Kind: OpAppend, Chain: "B", Rule: Rule{"-m", "comment", "--comment", "a b", "-j", "ACCEPT"}},
		{Kind: OpInsert, Chain: "INPUT", Pos: 1, Rule: Rule{"-j", "B"}},
		{Kind: OpDelete, Chain: "INPUT", Rule: Rule{"-j", "A"}},
		{Kind: OpFlush, Chain: "A"},
		{Kind: OpDeleteChain, Chain: "A"},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "*filter\n:B - [0:0]\n-A B -m comment --comment \"a b\" -j ACCEPT\n-I INPUT 1 -j B\n-D INPUT -j A\n-F A\n-X A\nCOMMIT\n"
	if diff := cmp.Diff(want, s); diff != "" {
		t.Errorf("restoreScript (-want +got):\n%s", diff)
	}
}

// FuzzParseTable feeds kernel listings (seeded with real captures) to the
// parser: it must never panic, and whatever it accepts must survive a
// render/parse round trip unchanged.
func FuzzParseTable(f *testing.F) {
	for _, name := range []string{"snapshot.v4.txt", "snapshot.v6.txt", "snapshot.v4-extra.txt"} {
		raw, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(raw))
	}
	f.Add("-P INPUT ACCEPT -c 1 2\n-A INPUT -c 3 4 -j DROP\n")
	f.Fuzz(func(t *testing.T, s string) {
		tb, err := parseTable(s)
		if err != nil {
			return
		}
		var b strings.Builder
		for _, c := range tb.Chains {
			b.WriteString("-N " + c + "\n")
		}
		for _, c := range tb.Chains {
			for _, r := range tb.Rules[c] {
				b.WriteString("-A " + c + " " + quoteArgs(r.Rule) + "\n")
			}
		}
		tb2, err := parseTable(b.String())
		if err != nil {
			t.Fatalf("re-parse of rendered table failed: %v\n%s", err, b.String())
		}
		for _, c := range tb.Chains {
			if !equalRules(rulesOf(tb.Rules[c]), rulesOf(tb2.Rules[c])) {
				t.Fatalf("chain %q changed in round trip:\n%q\n%q", c, rulesOf(tb.Rules[c]), rulesOf(tb2.Rules[c]))
			}
		}
	})
}
