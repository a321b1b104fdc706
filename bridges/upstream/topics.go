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
	return t, nil
}

// filter is the template as an MQTT subscription filter ({id} -> +).
func (t template) filter() string {
	l := append([]string(nil), t.levels...)
	l[t.idAt] = "+"
	return strings.Join(l, "/")
}

// match returns the device id and the levels matched by # if topic fits.
func (t template) match(topic string) (id string, rest []string, ok bool) {
	levels := strings.Split(topic, "/")
	n := len(t.levels) - 1 // without #
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

// render builds a topic from the template.
func (t template) render(id string, rest []string) string {
	l := append([]string(nil), t.levels[:len(t.levels)-1]...)
	l[t.idAt] = id
	l = append(l, rest...)
	return strings.Join(l, "/")
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

// matchFilter reports whether topic matches the MQTT filter f.
func matchFilter(f, topic string) bool {
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
