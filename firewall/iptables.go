package firewall

import (
	"bytes"
	"context"
	"errors"
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

// NewIPTables returns the real backends for IPv4 and IPv6: reads go
// through github.com/coreos/go-iptables, transactions through
// iptables-restore --noflush (one kernel transaction per family, which
// go-iptables does not offer). Needs root and the iptables package.
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
		proto, restore := iptables.ProtocolIPv4, "iptables-restore"
		if f == IPv6 {
			proto, restore = iptables.ProtocolIPv6, "ip6tables-restore"
		}
		ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(10))
		if err != nil {
			return nil, fmt.Errorf("%s backend: %w (is the iptables package installed?)", f, err)
		}
		path, err := exec.LookPath(restore)
		if err != nil {
			return nil, fmt.Errorf("%s backend: %w (is the iptables package installed?)", f, err)
		}
		return &iptablesBackend{family: f, ipt: ipt, restore: path, netns: cfg.netns}, nil
	}
	if v4, err = mk(IPv4); err != nil {
		return nil, nil, err
	}
	if v6, err = mk(IPv6); err != nil {
		return nil, nil, err
	}
	return v4, v6, nil
}

type iptablesBackend struct {
	family  Family
	ipt     *iptables.IPTables
	restore string
	netns   string
}

func (b *iptablesBackend) Family() Family { return b.family }

// in runs fn in the configured namespace; commands started by fn inherit
// the namespace of the thread that forks them.
func (b *iptablesBackend) in(ctx context.Context, fn func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if b.netns == "" {
		return fn()
	}
	return netns.Do(b.netns, fn)
}

func (b *iptablesBackend) ListChains(ctx context.Context) ([]string, error) {
	var chains []string
	err := b.in(ctx, func() error {
		var err error
		chains, err = b.ipt.ListChains("filter")
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s list chains of filter: %w", b.family, err)
	}
	return chains, nil
}

func (b *iptablesBackend) ListRules(ctx context.Context, chain string) ([]LiveRule, error) {
	var lines []string
	err := b.in(ctx, func() error {
		var err error
		lines, err = b.ipt.ListWithCounters("filter", chain)
		return err
	})
	if err != nil {
		var ie *iptables.Error
		if errors.As(err, &ie) && ie.IsNotExist() {
			return nil, fmt.Errorf("%s list filter/%s: %w", b.family, chain, ErrNoChain)
		}
		return nil, fmt.Errorf("%s list filter/%s: %w", b.family, chain, err)
	}
	var rules []LiveRule
	for _, l := range lines {
		if !strings.HasPrefix(l, "-A ") {
			continue // "-N chain" / "-P chain policy"
		}
		c, r, err := parseRuleLine(l)
		if err != nil {
			return nil, fmt.Errorf("%s list filter/%s: %w", b.family, chain, err)
		}
		if c != chain {
			return nil, fmt.Errorf("%s list filter/%s: got a rule of chain %q", b.family, chain, c)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

func (b *iptablesBackend) Commit(ctx context.Context, ops []Op) error {
	script, err := restoreScript(ops)
	if err != nil {
		return err
	}
	var out bytes.Buffer
	err = b.in(ctx, func() error {
		cmd := exec.CommandContext(ctx, b.restore, "--noflush", "--wait")
		cmd.Stdin = strings.NewReader(script)
		cmd.Stdout, cmd.Stderr = &out, &out
		return cmd.Run()
	})
	if err != nil {
		return fmt.Errorf("%s-restore of %d ops: %w: %s", b.family, len(ops), err, strings.TrimSpace(out.String()))
	}
	return nil
}
