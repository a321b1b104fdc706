package firewall

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"

	"github.com/coreos/go-iptables/iptables"

	"github.com/bastion-iot/bastion/internal/netns"
)

// IPTablesOption configures NewIPTables.
type IPTablesOption func(*iptablesConfig)

type iptablesConfig struct{ netns string }

// InNetns makes the backends act on the filter tables of the named network
// namespace (as made by `ip netns add`) instead of the caller's.
func InNetns(name string) IPTablesOption {
	return func(c *iptablesConfig) { c.netns = name }
}

// NewIPTables returns the real backends for IPv4 and IPv6. It finds the
// binaries and checks their version with github.com/coreos/go-iptables;
// reads are one `iptables -v -S` per snapshot and writes one
// `iptables-restore --noflush` per transaction, so every change is a
// single kernel transaction (go-iptables runs one command per rule, which
// is neither atomic nor fast: see docs/performance.md). Needs root and
// the iptables package (1.6.2 or newer, legacy or nf_tables).
func NewIPTables(opts ...IPTablesOption) (v4, v6 Backend, err error) {
	var cfg iptablesConfig
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.netns != "" {
		if _, err := netns.Path(cfg.netns); err != nil {
			return nil, nil, err
		}
	}
	mk := func(f Family) (Backend, error) {
		proto, list, restore := iptables.ProtocolIPv4, "iptables", "iptables-restore"
		if f == IPv6 {
			proto, list, restore = iptables.ProtocolIPv6, "ip6tables", "ip6tables-restore"
		}
		ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(10))
		if err != nil {
			return nil, fmt.Errorf("%s backend: %w (is the iptables package installed?)", f, err)
		}
		// --wait for iptables-restore and "-S -v" arrived in 1.6.2.
		if v1, v2, v3 := ipt.GetIptablesVersion(); v1 < 1 || (v1 == 1 && (v2 < 6 || (v2 == 6 && v3 < 2))) {
			return nil, fmt.Errorf("%s backend: version %d.%d.%d is too old: need 1.6.2 or newer", f, v1, v2, v3)
		}
		b := &iptablesBackend{family: f, netns: cfg.netns}
		if b.list, err = exec.LookPath(list); err != nil {
			return nil, fmt.Errorf("%s backend: %w (is the iptables package installed?)", f, err)
		}
		if b.restore, err = exec.LookPath(restore); err != nil {
			return nil, fmt.Errorf("%s backend: %w (is the iptables package installed?)", f, err)
		}
		return b, nil
	}
	if v4, err = mk(IPv4); err != nil {
		return nil, nil, err
	}
	if v6, err = mk(IPv6); err != nil {
		return nil, nil, err
	}
	return v4, v6, nil
}

// xtablesWait is how many seconds an iptables run waits for the xtables
// lock, which legacy iptables takes (iptables-nft takes none and ignores
// the option) and another program may hold. A bare --wait waits forever:
// a commit would hold Apply's lock, and the reload or pairing window
// behind it, for as long as that program does. iptables and
// iptables-restore 1.8.9 (Debian 12), legacy and nft, take the seconds as
// the next argument.
const xtablesWait = "10"

type iptablesBackend struct {
	family  Family
	list    string // iptables / ip6tables
	restore string // iptables-restore / ip6tables-restore
	netns   string
}

func (b *iptablesBackend) Family() Family { return b.family }

// in runs fn in the configured namespace; commands started by fn inherit
// the namespace of the thread that forks them. A command killed because
// ctx ended says only "signal: killed": the error then says why.
func (b *iptablesBackend) in(ctx context.Context, fn func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var err error
	if b.netns == "" {
		err = fn()
	} else {
		err = netns.Do(b.netns, fn)
	}
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", err, context.Cause(ctx))
	}
	return err
}

// Snapshot reads the table with one `iptables -v -S`: each iptables-nft
// run loads the whole ruleset from the kernel, so one listing per chain
// (go-iptables' List) would cost that many loads on every reconcile.
func (b *iptablesBackend) Snapshot(ctx context.Context) (Table, error) {
	var out, errb bytes.Buffer
	err := b.in(ctx, func() error {
		cmd := exec.CommandContext(ctx, b.list, "--wait", xtablesWait, "-t", "filter", "-v", "-S")
		cmd.Stdout, cmd.Stderr = &out, &errb
		return cmd.Run()
	})
	if err != nil {
		return Table{}, fmt.Errorf("%s -t filter -v -S: %w: %s", b.family, err, strings.TrimSpace(errb.String()))
	}
	t, err := parseTable(out.String())
	if err != nil {
		return Table{}, fmt.Errorf("%s -t filter -v -S: %w", b.family, err)
	}
	return t, nil
}

func (b *iptablesBackend) Commit(ctx context.Context, ops []Op) error {
	script, err := restoreScript(ops)
	if err != nil {
		return err
	}
	var out bytes.Buffer
	err = b.in(ctx, func() error {
		cmd := exec.CommandContext(ctx, b.restore, "--noflush", "--wait", xtablesWait)
		cmd.Stdin = strings.NewReader(script)
		cmd.Stdout, cmd.Stderr = &out, &out
		return cmd.Run()
	})
	if err != nil {
		return fmt.Errorf("%s-restore of %d ops: %w: %s", b.family, len(ops), err, strings.TrimSpace(out.String()))
	}
	return nil
}
