package gateway

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/console"
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
	c.OptOutsChanged = func(off map[string]bool) {
		g.applyOptOuts(off)
		// The firmware.status opt-out is a forwarding rule too.
		if err := g.applyForwardRules(); err != nil {
			g.log.Error("the privacy opt-outs are not in force in the upstream link's forwarding rules", "err", err)
		}
	}
	c.RulesChanged = func() error {
		if err := g.applyForwardRules(); err != nil {
			g.log.Error("forwarding rules from the console are not in force in the upstream link", "err", err)
			return err
		}
		return nil
	}
	g.consoleHandler.SetComponents(c)
}

// forwardRules is the effective privacy policy, for the link: the rules set
// in the console, those in bastion.yaml, and, while the firmware.status
// opt-out is on, a local rule for firmware status reports; where several
// match a topic the most restrictive decides (bridges/upstream). If the
// console's rules or the opt-outs cannot be read, the link holds
// (upstream.ActionHold): nothing is sent, as one of them may keep a topic
// local, and nothing queued is deleted, as a local rule on # did, though
// every queued message had been acknowledged to its device. Its devices'
// new messages are refused as a full queue and sent again by them.
func (g *Gateway) forwardRules(cfg upstream.Config) []upstream.Rule {
	rs, _ := g.readForwardRules(cfg)
	return rs
}

// readForwardRules is forwardRules that also returns why the rules are
// the hold's (nil: they are the ones read).
func (g *Gateway) readForwardRules(cfg upstream.Config) ([]upstream.Rule, error) {
	rs, err := g.effectiveRules(cfg)
	g.rulesHeld.Store(err != nil)
	if err != nil {
		g.log.Error("cannot read the privacy settings (the console's forwarding rules or opt-outs); the upstream link holds: it sends nothing and deletes nothing queued, and devices' new messages are refused until they can be read (fix the store, then save a rule in the console or reload: SIGHUP)", "err", err)
	}
	return rs, err
}

// holdRules is what the link applies while the console's privacy settings
// cannot be read: a hold, then the file's rules (a local one among them
// still withholds).
func holdRules(file []upstream.Rule) []upstream.Rule {
	return append([]upstream.Rule{{Topic: "#", Action: upstream.ActionHold}}, file...)
}

// fwStatusTopics are the firmware status reports' topics (statusTopic),
// kept local while the firmware.status opt-out is on.
const fwStatusTopics = "devices/+/" + hub.ClassStatus + "/fw/#"

// effectiveRules is forwardRules without its log and record, for display.
func (g *Gateway) effectiveRules(cfg upstream.Config) ([]upstream.Rule, error) {
	rs, err := g.store.ForwardRules()
	if err != nil {
		return holdRules(cfg.Forward), fmt.Errorf("read the console's forwarding rules: %w", err)
	}
	off, err := g.store.OptOuts()
	if err != nil {
		return holdRules(cfg.Forward), fmt.Errorf("read the privacy opt-outs: %w", err)
	}
	var out []upstream.Rule
	for _, r := range rs {
		out = append(out, upstream.Rule{Topic: r.Topic, Action: r.Action, Fields: r.Fields})
	}
	if off[optOutFwStatus] {
		out = append(out, upstream.Rule{Topic: fwStatusTopics, Action: upstream.ActionLocal})
	}
	return append(out, cfg.Forward...), nil
}

// applyForwardRules puts the console's rules in force. It changes the rules
// alone: a full Reload would also re-read the certificate files, and while
// those are unreadable or mid-rotation it would refuse the rule change too.
// When the privacy settings cannot be read it puts the hold in force
// (forwardRules) and returns why: the change the console just saved is not
// what applies, and the console says so. It returned nil then, and the
// console reported the change as in force while the link held.
func (g *Gateway) applyForwardRules() error {
	if g.upstream == nil {
		return nil
	}
	g.reloadMu.Lock()
	defer g.reloadMu.Unlock()
	rs, held := g.readForwardRules(g.cfg.Load().Upstream.Config)
	if err := g.upstream.SetForward(rs); err != nil {
		return err
	}
	if held != nil {
		return fmt.Errorf("the privacy settings cannot be read, so the upstream link holds instead of applying the rules: it sends nothing and deletes nothing queued, and devices' new messages are refused until they can be read (fix the store, then save a rule again): %w", held)
	}
	return nil
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
		var drift [][]string
		events := g.fw.Drift()
		for _, e := range events {
			drift = append(drift, []string{e.Time.UTC().Format(time.RFC3339), e.Family.String(), driftText(e)})
		}
		r.Sections = append(r.Sections, console.Section{
			Title:  fmt.Sprintf("Drift events (rules changed by something else, newest first; the last %d since start, all in the audit log as firewall.drift)", firewall.DriftHistory),
			Header: []string{"time", "family", "what"}, Table: drift,
			Alarm: repairFailedAlarm(events),
		})
	} else if plan, err := g.firewallPlan(ctx); err == nil {
		r.Sections = append(r.Sections, console.Section{Title: "Plan (not applied: firewall.manage is false)", Pre: plan})
	}
	return r, nil
}

// repairFailedAlarm is the firewall's alarm while the newest drift event of
// a family (events newest first) is a failed repair: that family's rules
// still differ from the policy, and may let in what it does not, until a
// later reconcile repairs them. A failed repair was only logged and
// listed, and the dashboard showed nothing.
func repairFailedAlarm(events []firewall.DriftEvent) string {
	var failed []string
	seen := map[firewall.Family]bool{}
	for _, e := range events {
		if seen[e.Family] {
			continue
		}
		seen[e.Family] = true
		if e.Err != "" {
			failed = append(failed, fmt.Sprintf("%s at %s (%s)", e.Family, e.Time.UTC().Format(time.RFC3339), e.Err))
		}
	}
	if len(failed) == 0 {
		return ""
	}
	return "the last repair of drifted rules failed (" + strings.Join(failed, "; ") + "): those rules differ from the policy and may let in what it does not; the firewall tries again at each check, and this clears once a repair succeeds (the log's \"firewall reconcile failed\" says why it fails)"
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
	rs, rerr := g.effectiveRules(cfg.Config)
	for _, r := range rs {
		rules = append(rules, []string{r.Topic, r.Action, strings.Join(r.Fields, ", ")})
	}
	// Last: it says why nothing moves, whatever else is wrong.
	switch {
	case rerr != nil:
		link.Alarm = "the privacy settings cannot be read (" + rerr.Error() + "): the link holds: it sends nothing and deletes nothing queued, and devices' new messages are refused (they keep them and send them again); fix the store, then save a forwarding rule or reload the configuration (SIGHUP)"
	case g.rulesHeld.Load():
		link.Alarm = "the link holds (it sends nothing, and devices' new messages are refused) since the privacy settings could not be read; they can be now: save a forwarding rule or reload the configuration (SIGHUP) to put them in force"
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
		console.Section{Title: "Forwarding rules in effect (the console's, the firmware.status opt-out's and bastion.yaml's; where several match, the most restrictive decides)", Header: []string{"topic", "action", "fields"}, Table: rules},
	)}, nil
}

// DeviceMessages lists device's messages in the upstream queue and the
// parking queue (console.UpstreamQueues), for the export of its data.
func (u consoleUpstream) DeviceMessages(ctx context.Context, device string, max, maxBytes int) (console.UpstreamMessages, error) {
	g := u.g
	out := console.UpstreamMessages{Messages: []console.UpstreamMessage{}}
	size := 0
	add := func(m console.UpstreamMessage) {
		if len(out.Messages) >= max || size+len(m.Payload) > maxBytes {
			out.Truncated = true
			return
		}
		size += len(m.Payload)
		out.Messages = append(out.Messages, m)
	}
	if g.queue == nil {
		return out, nil
	}
	err := eachOfDevice(ctx, g.queue, device, func(e queue.Entry) error {
		out.Queued++
		add(console.UpstreamMessage{Queue: "queued", Topic: e.Topic, Received: e.Received, QoS: e.QoS, Payload: slices.Clone(e.Payload)})
		return nil
	})
	if err != nil || g.parking == nil || g.upstream == nil {
		return out, err
	}
	// The parking queue's records carry why the broker refused them; the
	// link reads them (ListParked), the queue has the payloads.
	pk, err := g.upstream.ListParked(ctx, g.parking.Stats().Depth)
	if err != nil {
		return out, fmt.Errorf("list device %s's parked upstream messages: %w", device, err)
	}
	meta := map[uint64]upstream.ParkedMessage{}
	for _, m := range pk.Messages {
		if m.Device == device {
			meta[m.Seq] = m
		}
	}
	err = eachOfDevice(ctx, g.parking, device, func(e queue.Entry) error {
		m, ok := meta[e.Seq]
		if !ok {
			return nil // parked after the listing, or retried or dropped since
		}
		out.Parked++
		add(console.UpstreamMessage{Queue: "parked", Topic: m.Topic, Received: m.Received, QoS: m.QoS, Payload: slices.Clone(e.Payload), Refused: m.Why})
		return nil
	})
	return out, err
}

// DropDevice deletes device's messages from the parking queue, then from
// the upstream queue, where a retry of parked messages puts them
// (console.UpstreamQueues), for the erase of its data. A message the link
// is sending as they are deleted may still reach the cloud. Each deletion
// is on disk (SyncAcks) before it returns: an Ack alone waits in memory up
// to a second, or a minute after disk errors, and a power cut meanwhile
// brings the messages back, the queued ones to be sent to the cloud after
// an erase the audit log calls done.
func (u consoleUpstream) DropDevice(ctx context.Context, device string) (queued, parked int, err error) {
	g := u.g
	drop := func(q *queue.Queue, which string) (int, error) {
		n := 0
		err := eachOfDevice(ctx, q, device, func(e queue.Entry) error {
			if err := q.Ack(e.Seq); err != nil {
				return err
			}
			n++
			return nil
		})
		if err != nil {
			return n, fmt.Errorf("delete device %s's %s upstream messages: %w", device, which, err)
		}
		if err := q.SyncAcks(ctx); err != nil {
			return n, fmt.Errorf("device %s's %d %s upstream message(s) deleted, but the deletion may not be on disk yet (a power cut now could bring them back): check the disk, then erase again: %w", device, n, which, err)
		}
		return n, nil
	}
	if g.parking != nil {
		if parked, err = drop(g.parking, "parked"); err != nil {
			return 0, parked, err
		}
	}
	if g.queue != nil {
		if queued, err = drop(g.queue, "queued"); err != nil {
			return queued, parked, err
		}
	}
	if queued+parked > 0 {
		g.log.Info("upstream: a device's queued and parked messages deleted with its data", "device", device, "queued", queued, "parked", parked)
	}
	return queued, parked, nil
}

// eachOfDevice calls fn for each of device's messages q holds, oldest
// first: all those it holds when called, and those written meanwhile
// within a bound (as many again as it held, and a batch).
func eachOfDevice(ctx context.Context, q *queue.Queue, device string, fn func(queue.Entry) error) error {
	const batch = 64
	budget := 2*q.Stats().Depth + batch
	for after := uint64(0); budget > 0; {
		if err := ctx.Err(); err != nil {
			return err
		}
		es, err := q.Held(after, min(batch, budget))
		if err != nil {
			return fmt.Errorf("read the queue: %w", err)
		}
		if len(es) == 0 {
			return nil
		}
		budget -= len(es)
		for _, e := range es {
			after = e.Seq
			if e.Device != device {
				continue
			}
			if err := fn(e); err != nil {
				return err
			}
		}
	}
	return nil
}

type consoleFirmware struct{ g *Gateway }

func (f consoleFirmware) Show(ctx context.Context) (console.Report, error) {
	st := f.g.firmware.Status()
	valid := "never fetched"
	if !st.ValidUntil.IsZero() {
		valid = st.ValidUntil.UTC().Format(time.RFC3339)
	}
	v := st.Versions
	sec := console.Section{Title: "Firmware cache", Rows: [][2]string{
		{"frozen", strconv.FormatBool(st.Frozen)}, {"metadata valid until", valid},
		{"metadata versions", fmt.Sprintf("root %d, timestamp %d, snapshot %d, targets %d", v.Root, v.Timestamp, v.Snapshot, v.Targets)},
		{"cached", fmt.Sprintf("%d images, %d bytes", len(st.Images), st.Bytes)},
		{"last error", st.LastError},
	}}
	// Every alarm of the cache (freeze, refused targets, unreadable device
	// list) reaches the dashboard through the section's alarm.
	if len(st.Alarms) > 0 {
		sec.Alarm = strings.Join(st.Alarms, "; ")
	} else if st.Frozen {
		sec.Alarm = "firmware metadata expired or never fetched: no update is offered"
	}
	var imgs [][]string
	for _, im := range st.Images {
		imgs = append(imgs, []string{im.Class.String(), im.Version, strconv.FormatUint(im.Sequence, 10), strconv.FormatInt(im.Size, 10), im.SHA256})
	}
	slices.SortFunc(imgs, func(a, b []string) int { return strings.Compare(a[0], b[0]) })
	var floors [][]string
	for _, cl := range slices.Sorted(maps.Keys(st.Sequences)) {
		floors = append(floors, []string{cl, strconv.FormatUint(st.Sequences[cl], 10)})
	}
	secs := []console.Section{sec,
		{Title: "Images offered (verified, by device class)", Header: []string{"class", "version", "sequence", "bytes", "sha256"}, Table: imgs},
		{Title: "Anti-rollback floor (highest sequence seen, by class; nothing lower is offered)", Header: []string{"class", "sequence"}, Table: floors},
	}
	if f.g.optedOut(optOutFwStatus) {
		sec.Rows = append(sec.Rows, [2]string{"device update status", "not kept: the firmware.status privacy opt-out is on"})
		secs[0] = sec
		return console.Report{Sections: secs}, nil
	}
	var devs [][]string
	sts := f.g.firmware.DeviceStatuses()
	for _, id := range slices.Sorted(maps.Keys(sts)) {
		s := sts[id]
		devs = append(devs, []string{id, s.State, s.Version, s.SHA256, s.Detail, s.At.UTC().Format(time.RFC3339)})
	}
	return console.Report{Sections: append(secs, console.Section{Title: "Device update status (latest report; kept across restarts)",
		Header: []string{"device", "state", "version", "sha256", "detail", "reported"}, Table: devs})}, nil
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
