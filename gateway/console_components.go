package gateway

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/gateway/store"
)

// wireConsole gives the console the parts that exist in this gateway.
func (g *Gateway) wireConsole() {
	if g.consoleHandler == nil {
		return
	}
	c := console.Components{Firewall: consoleFirewall{g}, Upstream: consoleUpstream{g}}
	if g.hub != nil {
		c.Traffic = consoleTraffic{g}
	}
	if g.firmware != nil {
		c.Firmware = consoleFirmware{g}
	}
	if g.pairing != nil {
		c.Pairing = consolePairing{g.pairing}
	}
	c.OptOutsChanged = g.applyOptOuts
	c.RulesChanged = func([]store.ForwardRule) error {
		if err := g.applyForwardRules(); err != nil {
			g.log.Error("forwarding rules from the console could not be applied to the upstream link; the previous rules stay in force", "err", err)
			return err
		}
		return nil
	}
	g.consoleHandler.SetComponents(c)
}

// forwardRules is the effective privacy policy: the rules set in the
// console and those in bastion.yaml; where several match a topic the most
// restrictive decides (bridges/upstream). If the console's rules cannot be
// read, nothing is forwarded: one of them may be a local rule.
func (g *Gateway) forwardRules(cfg upstream.Config) []upstream.Rule {
	rs, err := g.store.ForwardRules()
	if err != nil {
		g.log.Error("cannot read the console's forwarding rules; forwarding nothing upstream until they can be read (restart or change a rule to try again)", "err", err)
		return []upstream.Rule{{Topic: "#", Action: upstream.ActionLocal}}
	}
	var out []upstream.Rule
	for _, r := range rs {
		out = append(out, upstream.Rule{Topic: r.Topic, Action: r.Action, Fields: r.Fields})
	}
	return append(out, cfg.Forward...)
}

// applyForwardRules puts the console's rules in force. It changes the rules
// alone: a full Reload would also re-read the certificate files, and while
// those are unreadable or mid-rotation it would refuse the rule change too.
func (g *Gateway) applyForwardRules() error {
	if g.upstream == nil {
		return nil
	}
	g.reloadMu.Lock()
	defer g.reloadMu.Unlock()
	return g.upstream.SetForward(g.forwardRules(g.cfg.Load().Upstream.Config))
}

type consoleFirewall struct{ g *Gateway }

func (f consoleFirewall) Show(ctx context.Context) (console.Report, error) {
	g := f.g
	cfg := g.cfg.Load()
	var svc [][]string
	if p, err := cfg.FirewallPolicy(); err == nil {
		for _, s := range p.Services {
			svc = append(svc, []string{s.Name, fmt.Sprintf("%d/%s", s.Port, s.Proto), strings.Join(s.Zones, ", ")})
		}
	}
	r := console.Report{Sections: []console.Section{{
		Title: "Policy",
		Rows: [][2]string{
			{"managed", strconv.FormatBool(g.fw != nil)},
			{"lan", strings.Join(cfg.Firewall.LAN, ", ")},
			{"wan", strings.Join(cfg.Firewall.WAN, ", ")},
			{"handshake rate", cfg.Firewall.HandshakeRate},
		},
		Header: []string{"service", "port", "zones"},
		Table:  svc,
	}}}
	if g.fw != nil {
		live, err := g.fw.Show(ctx)
		if err != nil {
			return r, err
		}
		r.Sections = append(r.Sections, console.Section{Title: "Live rules", Pre: live})
	} else if plan, err := g.firewallPlan(ctx); err == nil {
		r.Sections = append(r.Sections, console.Section{Title: "Plan (not applied: firewall.manage is false)", Pre: plan})
	}
	return r, nil
}

type consoleUpstream struct{ g *Gateway }

func (u consoleUpstream) Show(ctx context.Context) (console.Report, error) {
	g := u.g
	cfg := g.cfg.Load().Upstream
	if g.upstream == nil {
		return console.Report{Sections: []console.Section{{Title: "Upstream", Rows: [][2]string{{"state", "off (upstream.enabled: false): device data stays on this box"}}}}}, nil
	}
	st := g.upstream.Status()
	q := g.queue.Stats()
	link := console.Section{Title: "Link", Rows: [][2]string{
		{"broker", st.Broker}, {"server name", st.ServerName}, {"connected", strconv.FormatBool(st.Connected)},
		{"client certificate", st.ClientCertSubject + " until " + st.ClientCertNotAfter.Format(time.DateOnly)},
		{"published", strconv.FormatUint(st.Published, 10)}, {"withheld by privacy rules", strconv.FormatUint(st.Withheld, 10)},
		{"commands delivered", strconv.FormatUint(st.Downlink, 10)},
		{"commands subscribed", strconv.FormatBool(st.DownlinkSubscribed)},
		{"queue", fmt.Sprintf("%d messages, %d bytes", q.Depth, q.Bytes)},
	}}
	if st.ClientCertWarning != "" {
		link.Alarm = st.ClientCertWarning
	}
	if g.parking != nil {
		ps := g.parking.Stats()
		link.Rows = append(link.Rows, [2]string{"parked (refused by the broker for good)", fmt.Sprintf("%d messages, %d bytes", ps.Depth, ps.Bytes)})
		if ps.Depth > 0 {
			link.Alarm = fmt.Sprintf("%d messages refused by the broker are held on this box (last: %s): fix the cause, then bastionctl upstream parked retry (or drop)", ps.Depth, st.LastParked)
		}
	}
	if !st.Connected && st.LastError != "" {
		link.Alarm = "upstream disconnected: " + st.LastError
	}
	var maps [][]string
	for _, m := range cfg.Uplink {
		maps = append(maps, []string{"uplink", m.Local, m.Remote})
	}
	for _, m := range cfg.Downlink {
		maps = append(maps, []string{"downlink", m.Remote, m.Local})
	}
	var rules [][]string
	for _, r := range g.forwardRules(cfg.Config) {
		rules = append(rules, []string{r.Topic, r.Action, strings.Join(r.Fields, ", ")})
	}
	secs := []console.Section{link}
	if pk, err := g.upstream.ListParked(ctx, 20); err == nil && pk.Depth > 0 {
		var rows [][]string
		for _, m := range pk.Messages {
			rows = append(rows, []string{m.Device, m.Topic, strconv.Itoa(m.Bytes), m.Received.Format(time.DateTime), m.Why})
		}
		secs = append(secs, console.Section{Title: fmt.Sprintf("Parked messages (%d; bastionctl upstream parked retry | drop)", pk.Depth),
			Header: []string{"device", "topic", "bytes", "received", "refused"}, Table: rows})
	}
	return console.Report{Sections: append(secs,
		console.Section{Title: "Topic mapping", Header: []string{"direction", "from", "to"}, Table: maps},
		console.Section{Title: "Forwarding rules in effect (the console's and bastion.yaml's; where several match, the most restrictive decides)", Header: []string{"topic", "action", "fields"}, Table: rules},
	)}, nil
}

type consoleFirmware struct{ g *Gateway }

func (f consoleFirmware) Show(ctx context.Context) (console.Report, error) {
	st := f.g.firmware.Status()
	sec := console.Section{Title: "Firmware cache", Rows: [][2]string{
		{"frozen", strconv.FormatBool(st.Frozen)}, {"last error", st.LastError},
	}}
	if st.Frozen {
		sec.Alarm = "firmware metadata expired or never fetched: no update is offered"
	}
	if f.g.optedOut(optOutFwStatus) {
		sec.Rows = append(sec.Rows, [2]string{"device update status", "not kept: the firmware.status privacy opt-out is on"})
		return console.Report{Sections: []console.Section{sec}}, nil
	}
	var devs [][]string
	sts := f.g.firmware.DeviceStatuses()
	for _, id := range slices.Sorted(maps.Keys(sts)) {
		s := sts[id]
		devs = append(devs, []string{id, s.State, s.Version, s.SHA256, s.Detail, s.At.UTC().Format(time.RFC3339)})
	}
	return console.Report{Sections: []console.Section{sec, {Title: "Device update status (latest report; kept across restarts)",
		Header: []string{"device", "state", "version", "sha256", "detail", "reported"}, Table: devs}}}, nil
}

func (f consoleFirmware) CheckNow(ctx context.Context, who console.Actor) error {
	err := f.g.firmware.Check(ctx)
	f.g.devices.audit(Actor{Name: who.Name, Remote: who.Remote}, "firmware.check", "", errString(err))
	return err
}

func (f consoleFirmware) ForgetDevice(ctx context.Context, device string) error {
	return f.g.firmware.ForgetDevice(device)
}

// consoleTraffic gives the device page its counters (since start, in memory).
type consoleTraffic struct{ g *Gateway }

func (t consoleTraffic) Counters(ctx context.Context, device string) (console.DeviceCounters, bool) {
	c, ok := t.g.hub.Traffic(device)
	if !ok {
		return console.DeviceCounters{}, false
	}
	return console.DeviceCounters{MessagesIn: c.MessagesIn, MessagesOut: c.MessagesOut, BytesIn: c.BytesIn,
		BytesOut: c.BytesOut, Refused: c.Refused, LastSeen: c.LastSeen}, true
}
