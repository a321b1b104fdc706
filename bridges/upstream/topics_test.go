package upstream

import (
	"strings"
	"testing"
)

// splitMatch, splitRender and splitMatchFilter are the level-splitting
// versions match, render and matchFilter replaced (they allocated on every
// message); the fuzz target checks the new ones give the same answers.
func splitMatch(t template, topic string) (id string, rest []string, ok bool) {
	levels := strings.Split(topic, "/")
	n := len(t.levels) - 1
	if len(levels) < n {
		return "", nil, false
	}
	for i := 0; i < n; i++ {
		if i == t.idAt {
			if levels[i] == "" || strings.ContainsAny(levels[i], "+#") {
				return "", nil, false
			}
			id = levels[i]
			continue
		}
		if levels[i] != t.levels[i] {
			return "", nil, false
		}
	}
	return id, levels[n:], true
}

func splitRender(t template, id string, rest []string) string {
	l := append([]string(nil), t.levels[:len(t.levels)-1]...)
	l[t.idAt] = id
	l = append(l, rest...)
	return strings.Join(l, "/")
}

func splitMatchFilter(f, topic string) bool {
	fl, tl := strings.Split(f, "/"), strings.Split(topic, "/")
	for i, l := range fl {
		if l == "#" {
			return true
		}
		if i >= len(tl) {
			return false
		}
		if l != "+" && l != tl[i] {
			return false
		}
	}
	return len(fl) == len(tl)
}

// FuzzTopicMatch: topics come from devices and from the broker. The
// allocation-free matching must agree with the level-splitting one for
// every template, filter and topic.
func FuzzTopicMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"devices/{id}/t/#", "devices/d1/t/temp"}, {"devices/{id}/t/#", "devices/d1/t"}, {"devices/{id}/t/#", "devices/d1/t/"},
		{"devices/{id}/t/#", "devices/d1"}, {"devices/{id}/t/#", "devices//t/x"}, {"devices/{id}/t/#", "devices/d+/t/x"},
		{"{prefix}/{gateway}/{id}/c/#", "bastion/gw1/d7/c/set/led"}, {"{id}/#", "d1"}, {"{id}/#", "/"}, {"a/{id}/b/c/#", "a/x/b/c//"},
		{"devices/+/t/#", "devices/d1/t"}, {"devices/+/t/location", "devices/d1/t/location/x"}, {"#", ""}, {"+", ""}, {"a/+", "a/"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, tmpl, topic string) {
		if tp, err := compile(tmpl, "bastion", "gw1"); err == nil {
			id, rest, ok := tp.match(topic)
			wid, wrest, wok := splitMatch(tp, topic)
			if id != wid || ok != wok {
				t.Fatalf("template %q, topic %q: match = %q %v, split match = %q %v", tmpl, topic, id, ok, wid, wok)
			}
			if ok {
				if got, want := tp.render(id, rest), splitRender(tp, wid, wrest); got != want {
					t.Fatalf("template %q, topic %q: render = %q, split render = %q", tmpl, topic, got, want)
				}
			}
		}
		if got, want := matchFilter(tmpl, topic), splitMatchFilter(tmpl, topic); got != want {
			t.Fatalf("matchFilter(%q, %q) = %v, split = %v", tmpl, topic, got, want)
		}
	})
}

// TestMappingAllocs: the uplink mapping and the privacy rules run twice for
// every message (at Accept and when sending); only the mapped topic is
// allocated.
func TestMappingAllocs(t *testing.T) {
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		t.Fatal(err)
	}
	rules := []Rule{{Topic: "devices/+/t/location", Action: ActionLocal}, {Topic: "devices/+/t/#", Action: ActionForward}}
	payload := []byte(`{"v":1}`)
	var got string
	allocs := testing.AllocsPerRun(1000, func() {
		got, _ = rs.mapUp("dev-17", "devices/dev-17/t/sensors/temp")
		if v, _, _ := applyRules(rules, "devices/dev-17/t/sensors/temp", payload); v != send {
			t.Fatal("not forwarded")
		}
	})
	if !rs.mapsUp("dev-17", "devices/dev-17/t/sensors/temp") || rs.mapsUp("dev-17", "devices/dev-18/t/sensors/temp") {
		t.Error("mapsUp disagrees with mapUp")
	}
	if n := testing.AllocsPerRun(100, func() { rs.mapsUp("dev-17", "devices/dev-17/t/sensors/temp") }); n != 0 {
		t.Errorf("mapsUp (the admission check): %.1f allocations, want 0", n)
	}
	if got != "bastion/gw1/dev-17/t/sensors/temp" {
		t.Fatalf("mapUp = %q", got)
	}
	if allocs > 1 {
		t.Errorf("mapUp + applyRules: %.1f allocations per message, want at most 1 (the mapped topic)", allocs)
	}
}
