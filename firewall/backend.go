package firewall

import (
	"context"
	"fmt"
	"strconv"
	"strings"
)

// Backend is everything Bastion asks of one family's filter table, in its
// own verbs. NewIPTables returns the real ones; Fake is the in-memory one.
type Backend interface {
	Family() Family
	// Snapshot reads the whole filter table at once: chain names and every
	// rule in `iptables -S` form, with counters.
	Snapshot(ctx context.Context) (Table, error)
	// Commit applies ops as one transaction: all of them or none.
	Commit(ctx context.Context, ops []Op) error
}

// Table is a snapshot of one family's filter table.
type Table struct {
	Chains []string              // built-in chains first, in the order listed
	Rules  map[string][]LiveRule // by chain, in order
}

// OpKind is what an Op does.
type OpKind int

// The operations a transaction is made of, as iptables-restore spells them.
const (
	OpNewChain    OpKind = iota // ":CHAIN - [0:0]" (create; flushes an existing chain)
	OpAppend                    // "-A CHAIN rule"
	OpInsert                    // "-I CHAIN pos rule"
	OpDelete                    // "-D CHAIN rule" (first exact match)
	OpFlush                     // "-F CHAIN"
	OpDeleteChain               // "-X CHAIN" (must be empty and unreferenced)
)

// Op is one step of a transaction.
type Op struct {
	Kind  OpKind
	Chain string
	Pos   int // OpInsert only, 1-based
	Rule  Rule
}

// String renders op as a line of iptables-restore input.
func (o Op) String() string {
	switch o.Kind {
	case OpNewChain:
		return ":" + o.Chain + " - [0:0]"
	case OpAppend:
		return "-A " + o.Chain + " " + quoteArgs(o.Rule)
	case OpInsert:
		return "-I " + o.Chain + " " + strconv.Itoa(o.Pos) + " " + quoteArgs(o.Rule)
	case OpDelete:
		return "-D " + o.Chain + " " + quoteArgs(o.Rule)
	case OpFlush:
		return "-F " + o.Chain
	case OpDeleteChain:
		return "-X " + o.Chain
	}
	return fmt.Sprintf("# unknown op %d", o.Kind)
}

// restoreScript renders ops as one iptables-restore --noflush transaction
// on the filter table. It refuses anything that could smuggle a second
// command into the input (line breaks, NUL, names with blanks).
func restoreScript(ops []Op) (string, error) {
	var b strings.Builder
	b.WriteString("*filter\n")
	for _, o := range ops {
		if o.Chain == "" || strings.ContainsAny(o.Chain, " \t\r\n\x00\"'\\") || strings.HasPrefix(o.Chain, "-") {
			return "", fmt.Errorf("restore script: bad chain name %q", o.Chain)
		}
		for _, a := range o.Rule {
			if strings.ContainsAny(a, "\r\n\x00") {
				return "", fmt.Errorf("restore script: argument %q of a rule in %s contains a line break or NUL", a, o.Chain)
			}
		}
		b.WriteString(o.String())
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
	return b.String(), nil
}
