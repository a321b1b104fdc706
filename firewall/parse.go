package firewall

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// quoteArg writes a as iptables prints and iptables-restore reads it:
// bare if it has no blank or quote, else in double quotes with '"' and
// '\' escaped.
func quoteArg(a string) string {
	if a != "" && !strings.ContainsAny(a, " \t\"\\'#") {
		return a
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`)
	return `"` + r.Replace(a) + `"`
}

func quoteArgs(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = quoteArg(a)
	}
	return strings.Join(q, " ")
}

// splitArgs splits one line of `iptables -S` output into arguments,
// undoing the quoting quoteArg applies.
func splitArgs(line string) ([]string, error) {
	var args []string
	var cur strings.Builder
	inArg, quoted := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\' && i+1 < len(line) && (line[i+1] == '"' || line[i+1] == '\\'):
			i++
			cur.WriteByte(line[i])
		case c == '"':
			quoted = !quoted
			inArg = true
		case !quoted && (c == ' ' || c == '\t'):
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
		case c == '\n' || c == '\r' || c == 0:
			return nil, fmt.Errorf("control character %q at offset %d", c, i)
		default:
			cur.WriteByte(c)
			inArg = true
		}
	}
	if quoted {
		return nil, errors.New("unterminated quote")
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args, nil
}

// LiveRule is a rule read back from the kernel, with its counters.
type LiveRule struct {
	Rule    Rule
	Packets uint64
	Bytes   uint64
}

// parseRuleLine parses one "-A <chain> ..." line of `iptables -v -S`
// output (kernel state, so treated as untrusted) into the chain, the rule
// without its counters, and the counters ("-c <packets> <bytes>", wherever
// iptables placed them).
func parseRuleLine(line string) (chain string, r LiveRule, err error) {
	args, err := splitArgs(line)
	if err != nil {
		return "", LiveRule{}, fmt.Errorf("parse rule %q: %w", line, err)
	}
	if len(args) < 2 || args[0] != "-A" || args[1] == "" {
		return "", LiveRule{}, fmt.Errorf("parse rule %q: want \"-A <chain> ...\"", line)
	}
	chain, rest := args[1], args[2:]
	spec := make(Rule, 0, len(rest))
	seen := false
	for i := 0; i < len(rest); i++ {
		if rest[i] == "-c" && !seen && i+2 < len(rest) {
			p, perr := strconv.ParseUint(rest[i+1], 10, 64)
			b, berr := strconv.ParseUint(rest[i+2], 10, 64)
			if perr == nil && berr == nil {
				r.Packets, r.Bytes, seen = p, b, true
				i += 2
				continue
			}
		}
		spec = append(spec, rest[i])
	}
	// What is left must not read as counters again: a second numeric
	// "-c N M" would make the rule mean two things, so it is refused.
	for i := 0; i+2 < len(spec); i++ {
		if spec[i] == "-c" && isUint(spec[i+1]) && isUint(spec[i+2]) {
			return "", LiveRule{}, fmt.Errorf("parse rule %q: more than one \"-c <packets> <bytes>\" counter field", line)
		}
	}
	r.Rule = spec
	return chain, r, nil
}

func isUint(s string) bool {
	_, err := strconv.ParseUint(s, 10, 64)
	return err == nil
}

// parseTable parses the output of `iptables -t filter -v -S` (kernel
// state, so treated as untrusted): "-P chain policy [-c p b]", "-N chain"
// and "-A chain rule" lines.
func parseTable(out string) (Table, error) {
	t := Table{Rules: map[string][]LiveRule{}}
	known := map[string]bool{}
	for n, line := range strings.Split(out, "\n") {
		line = strings.TrimRight(line, "\r")
		switch {
		case line == "":
		case strings.HasPrefix(line, "-P ") || strings.HasPrefix(line, "-N "):
			f := strings.Fields(line)
			if len(f) < 2 {
				return Table{}, fmt.Errorf("line %d: %q: chain name missing", n+1, line)
			}
			if strings.ContainsAny(f[1], `"'\\`) {
				return Table{}, fmt.Errorf("line %d: chain name %q has quotes or backslashes", n+1, f[1])
			}
			if known[f[1]] {
				return Table{}, fmt.Errorf("line %d: chain %q listed twice", n+1, f[1])
			}
			known[f[1]] = true
			t.Chains = append(t.Chains, f[1])
		case strings.HasPrefix(line, "-A "):
			chain, r, err := parseRuleLine(line)
			if err != nil {
				return Table{}, fmt.Errorf("line %d: %w", n+1, err)
			}
			if !known[chain] {
				return Table{}, fmt.Errorf("line %d: rule of undeclared chain %q", n+1, chain)
			}
			t.Rules[chain] = append(t.Rules[chain], r)
		default:
			return Table{}, fmt.Errorf("line %d: %q: not a -P, -N or -A line", n+1, line)
		}
	}
	return t, nil
}
