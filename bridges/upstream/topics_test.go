package upstream

import (
	"fmt"
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
		if v, _, _, _ := applyRules(rules, "devices/dev-17/t/sensors/temp", payload); v != send {
			t.Fatal("not forwarded")
		}
	})
	for _, tc := range []struct{ dev, topic string }{
		{"dev-17", "devices/dev-17/t/sensors/temp"}, {"dev-17", "devices/dev-17/t"}, {"dev-17", "devices/dev-17/t/"},
		{"dev-17", "devices/dev-18/t/sensors/temp"}, {"dev-17", "devices/dev-17/c/x"},
	} {
		up, ok := rs.mapUp(tc.dev, tc.topic)
		length, levels, shaped := rs.upShape(tc.dev, tc.topic)
		if shaped != ok || ok && (length != len(up) || levels != strings.Count(up, "/")+1) {
			t.Errorf("upShape(%s, %q) = %d bytes, %d levels, %v; mapUp gives %q, %v", tc.dev, tc.topic, length, levels, shaped, up, ok)
		}
	}
	if n := testing.AllocsPerRun(100, func() { rs.upShape("dev-17", "devices/dev-17/t/sensors/temp") }); n != 0 {
		t.Errorf("upShape (the admission check): %.1f allocations, want 0", n)
	}
	if got != "bastion/gw1/dev-17/t/sensors/temp" {
		t.Fatalf("mapUp = %q", got)
	}
	if allocs > 1 {
		t.Errorf("mapUp + applyRules: %.1f allocations per message, want at most 1 (the mapped topic)", allocs)
	}
}

// TestMappedTopics: the sender's remembered mapping answers as mapUp does,
// allocates nothing for a topic it has seen, forgets everything when the
// snapshot changes (Reload), never maps another device's topic, and stays
// bounded.
func TestMappedTopics(t *testing.T) {
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		t.Fatal(err)
	}
	s1 := &snapshot{cfg: c, routes: rs}
	var mt mappedTopics
	got, ok := mt.mapUp(s1, "dev-17", "devices/dev-17/t/sensors/temp")
	if want, _ := rs.mapUp("dev-17", "devices/dev-17/t/sensors/temp"); !ok || got != want {
		t.Fatalf("mapUp = %q %v, want %q", got, ok, want)
	}
	if n := testing.AllocsPerRun(100, func() { mt.mapUp(s1, "dev-17", "devices/dev-17/t/sensors/temp") }); n != 0 {
		t.Errorf("a remembered topic: %.1f allocations, want 0", n)
	}
	if up, ok := mt.mapUp(s1, "dev-18", "devices/dev-17/t/sensors/temp"); ok {
		t.Errorf("another device's topic mapped to %q", up)
	}
	c2 := c
	c2.Prefix = "other"
	rs2, err := c2.compile()
	if err != nil {
		t.Fatal(err)
	}
	s2 := &snapshot{cfg: c2, routes: rs2}
	if got, _ := mt.mapUp(s2, "dev-17", "devices/dev-17/t/sensors/temp"); got != "other/gw1/dev-17/t/sensors/temp" {
		t.Errorf("after a reload: %q, want the new prefix", got)
	}
	for i := range 3 * maxMapped {
		dev := fmt.Sprintf("d%d", i)
		if _, ok := mt.mapUp(s2, dev, "devices/"+dev+"/t/x"); !ok {
			t.Fatalf("device %s not mapped", dev)
		}
		if len(mt.m) > maxMapped {
			t.Fatalf("%d topics kept, bound %d", len(mt.m), maxMapped)
		}
	}
}
