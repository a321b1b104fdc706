package gateway

import (
	"context"
	"fmt"
	"net/http"
	"os"

	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/config"
)

// openFirewall applies the policy before any listener binds, so that the
// box is never more open than the policy: a listener that comes up finds
// its port already filtered to the lan zone.
func (g *Gateway) openFirewall(ctx context.Context, cfg config.Config) error {
	if !cfg.Firewall.Manage {
		return nil
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("firewall.manage is true but bastiond is not root (it needs CAP_NET_ADMIN to apply iptables rules): run it as root, or set firewall.manage: false in %s to only print the plan", g.configPath)
	}
	v4, v6, err := firewall.NewIPTables()
	if err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	if g.fw, err = firewall.New(v4, v6, g.log.With("component", "firewall"), g.metrics.reg); err != nil {
		return err
	}
	p, err := cfg.FirewallPolicy()
	if err != nil {
		return err
	}
	if err := g.fw.Apply(ctx, p); err != nil {
		return fmt.Errorf("firewall: apply policy: %w", err)
	}
	g.log.Info("firewall: policy applied", "services", len(p.Services), "lan", cfg.Firewall.LAN, "wan", cfg.Firewall.WAN)
	return nil
}

// firewallPlan is what the policy would install: the full rule set when
// Bastion does not manage the firewall, the diff against the kernel when it
// does.
func (g *Gateway) firewallPlan(ctx context.Context) (string, error) {
	cfg := g.cfg.Load()
	p, err := cfg.FirewallPolicy()
	if err != nil {
		return "", err
	}
	if g.fw != nil {
		return g.fw.Diff(ctx, p)
	}
	rs, err := firewall.Plan(p)
	if err != nil {
		return "", err
	}
	return rs.String(), nil
}

func (g *Gateway) controlFirewall(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/firewall/plan", func(w http.ResponseWriter, r *http.Request) {
		s, err := g.firewallPlan(r.Context())
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"managed": g.fw != nil, "plan": s})
	})
	mux.HandleFunc("GET /v1/firewall/show", func(w http.ResponseWriter, r *http.Request) {
		if g.fw == nil {
			writeErr(w, fmt.Errorf("%w: bastiond does not manage the firewall (firewall.manage: false); see bastionctl firewall plan", ErrBadRequest))
			return
		}
		s, err := g.fw.Show(r.Context())
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"managed": true, "rules": s})
	})
	mux.HandleFunc("POST /v1/firewall/remove", func(w http.ResponseWriter, r *http.Request) {
		fw := g.fw
		if fw == nil {
			// Rules left by an earlier run with manage: true can still be removed.
			if os.Geteuid() != 0 {
				writeErr(w, fmt.Errorf("%w: removing firewall rules needs root", ErrBadRequest))
				return
			}
			v4, v6, err := firewall.NewIPTables()
			if err == nil {
				fw, err = firewall.New(v4, v6, g.log, nil)
			}
			if err != nil {
				writeErr(w, err)
				return
			}
		}
		if err := fw.Remove(r.Context()); err != nil {
			writeErr(w, err)
			return
		}
		g.devices.audit(ctlActor, "firewall.remove", "", "")
		g.log.Warn("firewall: rules removed on request; the box is unfiltered until the next apply")
		writeJSON(w, http.StatusOK, map[string]any{"removed": true})
	})
}
