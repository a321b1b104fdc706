package upstream

import (
	"fmt"
	"strings"
)

// Topic templates are MQTT topic filters with placeholders as whole levels:
// {id} (the device, exactly once), {prefix} and {gateway} (from the config),
// ending in "#" (the rest of the topic, carried over unchanged).

// template is a compiled mapping side.
type template struct {
	levels []string // with {prefix} and {gateway} substituted; {id} and # kept
	idAt   int
	// pre and post surround {id} when rendering: the levels before it
	// (each followed by "/") and those after it up to # (each preceded by
	// "/"), so that render is one concatenation.
	pre, post string
}

func compile(tmpl, prefix, gateway string) (template, error) {
	if tmpl == "" {
		return template{}, fmt.Errorf("empty template")
	}
	levels := strings.Split(tmpl, "/")
	t := template{idAt: -1}
	for i, l := range levels {
		switch {
		case l == "{prefix}":
			l = prefix
		case l == "{gateway}":
			l = gateway
		case l == "{id}":
			if t.idAt >= 0 {
				return template{}, fmt.Errorf("%q has {id} twice", tmpl)
			}
			t.idAt = i
		case l == "#":
			if i != len(levels)-1 {
				return template{}, fmt.Errorf("%q: # must be the last level", tmpl)
			}
		case l == "" || strings.ContainsAny(l, "+#{}") || strings.HasPrefix(l, "$"):
			return template{}, fmt.Errorf("%q: level %q is not accepted (use plain names, {id}, {prefix}, {gateway}, and a final #)", tmpl, l)
		}
		t.levels = append(t.levels, l)
	}
	if t.idAt < 0 {
		return template{}, fmt.Errorf("%q has no {id} level", tmpl)
	}
	if t.levels[len(t.levels)-1] != "#" {
		return template{}, fmt.Errorf("%q must end in /#", tmpl)
	}
	for _, l := range t.levels[:t.idAt] {
		t.pre += l + "/"
	}
	for _, l := range t.levels[t.idAt+1 : len(t.levels)-1] {
		t.post += "/" + l
	}
	return t, nil
}

// filter is the template as an MQTT subscription filter ({id} -> +).
func (t template) filter() string {
	l := append([]string(nil), t.levels...)
	l[t.idAt] = "+"
	return strings.Join(l, "/")
}

// match returns the device id and what # matched if topic fits: rest is
// "" when the topic ends where # begins, else the remaining levels with
// their leading "/" (a slice of topic: match allocates nothing, as it runs
// twice for every message).
func (t template) match(topic string) (id, rest string, ok bool) {
	n := len(t.levels) - 1 // without #
	rem, more := topic, true
	for i := 0; i < n; i++ {
		if !more {
			return "", "", false
		}
		var l string
		l, rem, more = strings.Cut(rem, "/")
		if i == t.idAt {
			if l == "" || strings.ContainsAny(l, "+#") {
				return "", "", false
			}
			id = l
			continue
		}
		if l != t.levels[i] {
			return "", "", false
		}
	}
	if more {
		rest = topic[len(topic)-len(rem)-1:]
	}
	return id, rest, true
}

// render builds a topic from the template, id and what match returned as
// rest.
func (t template) render(id, rest string) string {
	return t.pre + id + t.post + rest
}

// overlaps reports whether some topic matches both MQTT filters a and b.
func overlaps(a, b string) bool {
	x, y := strings.Split(a, "/"), strings.Split(b, "/")
	for i := 0; ; i++ {
		if i == len(x) || i == len(y) {
			if len(x) == len(y) {
				return true
			}
			// "a/#" also matches "a".
			if i < len(x) && x[i] == "#" || i < len(y) && y[i] == "#" {
				return true
			}
			return false
		}
		if x[i] == "#" || y[i] == "#" {
			return true
		}
		if x[i] != "+" && y[i] != "+" && x[i] != y[i] {
			return false
		}
	}
}

// overlapExample is a topic that matches both MQTT filters a and b, which
// overlap: for the error that refuses them.
func overlapExample(a, b string) string {
	x, y := strings.Split(a, "/"), strings.Split(b, "/")
	var t []string
	for i := 0; i < len(x) && i < len(y); i++ {
		if x[i] == "#" {
			t = append(t, y[i:]...)
			break
		}
		if y[i] == "#" {
			t = append(t, x[i:]...)
			break
		}
		l := x[i]
		if l == "+" {
			l = y[i]
		}
		t = append(t, l)
	}
	out := t[:0]
	for _, l := range t {
		switch l {
		case "#":
			continue
		case "+":
			l = "x"
		}
		out = append(out, l)
	}
	if len(out) == 0 {
		return "x"
	}
	return strings.Join(out, "/")
}

// validFilter checks an MQTT topic filter (privacy rules).
func validFilter(f string) error {
	if f == "" {
		return fmt.Errorf("empty filter")
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		switch {
		case l == "#" && i != len(levels)-1:
			return fmt.Errorf("%q: # must be the last level", f)
		case l != "#" && l != "+" && strings.ContainsAny(l, "+#"):
			return fmt.Errorf("%q: wildcard inside a level", f)
		}
	}
	return nil
}

// matchFilter reports whether topic matches the MQTT filter f. It walks
// both level by level without splitting them (it runs twice for every
// message and rule).
func matchFilter(f, topic string) bool {
	tdone := false
	for {
		var l, tl string
		var fmore, tmore bool
		l, f, fmore = strings.Cut(f, "/")
		if l == "#" {
			return true
		}
		if tdone {
			return false
		}
		tl, topic, tmore = strings.Cut(topic, "/")
		tdone = !tmore
		if l != "+" && l != tl {
			return false
		}
		if !fmore {
			return tdone
		}
	}
}

// mappedTopics remembers the uplink mapping's answers for one snapshot of
// the configuration, so that the link's sender does not build the same
// upstream topic string again for every message of a device (it was the
// one allocation per message left in the mapping). Bounded (maxMapped
// entries; when full it starts over); not safe for concurrent use (one
// per pipeline run, on the sender's goroutine).
type mappedTopics struct {
	s *snapshot
	m map[mappedKey]string
}

type mappedKey struct{ device, topic string }

const maxMapped = 1024

// mapUp is s.routes.mapUp, remembered.
func (mt *mappedTopics) mapUp(s *snapshot, device, topic string) (string, bool) {
	if mt.s != s { // a Reload: new rules, new answers
		mt.s = s
		clear(mt.m)
	}
	k := mappedKey{device, topic}
	if up, ok := mt.m[k]; ok {
		return up, true
	}
	up, ok := s.routes.mapUp(device, topic)
	if !ok {
		return "", false
	}
	if mt.m == nil {
		mt.m = make(map[mappedKey]string)
	}
	if len(mt.m) >= maxMapped {
		clear(mt.m)
	}
	mt.m[k] = up
	return up, true
}
