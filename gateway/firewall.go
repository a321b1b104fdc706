package gateway

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"golang.org/x/sys/unix"
)

// openFirewall applies the policy before any listener binds, so that the
// box is never more open than the policy: a listener that comes up finds
// its port already filtered to the lan zone.
func (g *Gateway) openFirewall(ctx context.Context, cfg config.Config) error {
	if !cfg.Firewall.Manage {
		return nil
	}
	if !hasNetAdmin() {
		return fmt.Errorf("firewall.manage is true but bastiond lacks CAP_NET_ADMIN (effective, and ambient when not root, so that iptables inherits it), which applying iptables rules needs: give it that capability (the appliance's bastiond.service runs it as user bastion with AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE), or set firewall.manage: false in %s to only print the plan", g.configPath)
	}
	v4, v6, err := firewall.NewIPTables(g.iptablesOpts...)
	if err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	if g.fw, err = firewall.New(v4, v6, g.log, g.metrics.reg, g.firewallOptions()...); err != nil {
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

// firewallOptions are the gateway's options for the firewall it manages:
// each drift event goes to the audit log as firewall.drift.
func (g *Gateway) firewallOptions() []firewall.Option {
	if g.driftAudit == nil {
		g.driftAudit = ratelog.New(driftAuditEvery)
	}
	return []firewall.Option{firewall.WithDriftHook(g.auditDrift)}
}

// driftAuditEvery spaces firewall.drift audit events per family and
// outcome: a repair that keeps failing, or a rule another program keeps
// changing back, is found at every reconcile (seconds apart), and one
// event each would push the audit log's older events (logins, pairing,
// revocations) out of its bounded count within hours.
const driftAuditEvery = 10 * time.Minute

// auditDrift records e in the audit log (actor firewall, target the
// family), which keeps it across restarts; the console lists it from the
// firewall's memory too.
func (g *Gateway) auditDrift(e firewall.DriftEvent) {
	kind := e.Family.String() + "/repaired"
	if e.Err != "" {
		kind = e.Family.String() + "/failed"
	}
	quiet, since, ok := g.driftAudit.Note(kind, time.Now())
	if !ok {
		return
	}
	text := driftText(e)
	if quiet > 0 {
		text += fmt.Sprintf(" (%d more like it since %s)", quiet, since.UTC().Format(time.RFC3339))
	}
	g.devices.audit(Actor{Name: "firewall"}, "firewall.drift", e.Family.String(), text)
}

// driftText says what a drift event found and whether it was repaired.
func driftText(e firewall.DriftEvent) string {
	var fs []string
	for _, f := range e.Findings {
		fs = append(fs, f.Kind+": "+f.Detail)
	}
	what := strings.Join(fs, "; ")
	if what == "" {
		what = "rules differed from the policy"
	}
	if e.Err != "" {
		return "repair failed (" + e.Err + "): " + what
	}
	return "repaired: " + what
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
			if !hasNetAdmin() {
				writeErr(w, fmt.Errorf("%w: removing firewall rules needs CAP_NET_ADMIN, which bastiond lacks", ErrBadRequest))
				return
			}
			v4, v6, err := firewall.NewIPTables(g.iptablesOpts...)
			if err == nil {
				// New requires a registry for its counters. Not the
				// gateway's: they would be registered there again at the
				// next remove, and this Firewall ends with the request.
				fw, err = firewall.New(v4, v6, g.log, prometheus.NewRegistry())
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

// hasNetAdmin reports whether bastiond, and the iptables it runs, may
// program the firewall. Being root is not the test: the appliance runs
// bastiond as user bastion with just the capabilities it needs. Root
// passes them to iptables through exec; another user only through the
// ambient set, so that is checked too.
func hasNetAdmin() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return os.Geteuid() == 0
	}
	if data[unix.CAP_NET_ADMIN/32].Effective&(1<<(unix.CAP_NET_ADMIN%32)) == 0 {
		return false
	}
	if os.Geteuid() == 0 {
		return true
	}
	amb, err := unix.PrctlRetInt(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_IS_SET, unix.CAP_NET_ADMIN, 0, 0)
	return err == nil && amb == 1
}
