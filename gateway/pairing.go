package gateway

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/button"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/clock"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/pki"
	"github.com/bastion-iot/bastion/pki/est"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

// Session identities of enrollment sessions, as bridges.Identity returns
// them. Operational device ids never contain ':' (pki.ValidDeviceID), so
// these can never be mistaken for one, and coap.Kind tells them apart.
const (
	idPAKE   = "pake:"
	idEnroll = "enroll:"
	idIDevID = "idevid:"
)

// pairingSvc wires the button, the pairing window, the setup codes and EST
// together. Nothing in it opens the window: only button events do, and
// they come only from the sources opened here from the configuration.
type pairingSvc struct {
	g        *Gateway
	win      *pairing.Window
	codes    *pairing.Codes
	enroller *pairing.Enroller
	sources  []button.Source
	watchers []*button.Watcher
	events   chan button.Event
	refused  *prometheus.CounterVec
	// msgRefused counts the messages of enrollment sessions refused
	// (bastion_pairing_messages_refused_total), by reason.
	msgRefused *prometheus.CounterVec
	// onEnd are called when the window closes: the transports end the
	// enrollment sessions it admitted (OnEnrollmentEnd). Set before Run.
	onEnd []func(kept string)
	// refusalAudit and refusalLines space the audit events and log lines
	// of refusals (pairing_refusals.go).
	refusalAudit *ratelog.Every // kinds: action "\x00" reason
	refusalLines *ratelog.Every
	// buttonErr is why a button source stopped, for the status.
	buttonErr atomic.Value
	// pakeMu runs one PAKE message at a time: a hello costs a scrypt
	// derivation (32 MiB), which must not run concurrently on a small box.
	pakeMu sync.Mutex
	// EST over HTTPS (pairing_est.go): opened and closed with the window.
	estChange chan struct{}
	estAddr   atomic.Value // string
	estCert   *pki.ServerCert
	// estRefusals counts and logs the handshakes the EST listener refuses
	// (made with the first listener, kept across windows).
	estRefusals *httpsRefusals
	// applyPolicy, if set (tests only), applies estFirewall's policy in
	// place of g.fw.Apply, which it may call.
	applyPolicy func(context.Context, firewall.Policy) error
	// derived remembers which expected device's code the code book holds
	// for which label id (derivedKey), so that a repeated hello does not
	// derive it again, and so that an enrollment can find every copy of
	// the code it spent. Guarded by mu.
	derived map[string]string

	// mu guards the maps below. Nothing calls into win (nor codes,
	// enroller) while holding it: any reading of the window may close it
	// and run p.audit on the same goroutine, which takes mu.
	mu sync.Mutex
	// vendors are the roots of manufacturer certificates (IDevID), by
	// vendor name: pairing.vendors, replaced whole by a reload.
	vendors map[string]*x509.CertPool
	pake    map[string]*pakeRun      // label device id → exchange after hello
	pending map[string]*pendingEnrol // label device id → PAKE done, EST next
	// idevWindow is when the window was opened in which an IDevID session
	// was accepted, by session identity.
	idevWindow map[string]time.Time

	// renew is the state of EST /sren renewals (renewal.go).
	renew renewals
	// sweepEvery is how often run deletes the expired setup codes
	// (expectSweepEvery; tests shorten it before Run).
	sweepEvery time.Duration
}

// expectSweepEvery is how often expired setup codes are looked for in the
// store: one read transaction, a write only when one has expired.
const expectSweepEvery = time.Minute

type pakeRun struct {
	s        *pairing.Session
	expected store.ExpectedDevice
}

type pendingEnrol struct {
	s        *pairing.Session
	psk      []byte
	expected store.ExpectedDevice
}

// openPairing builds the window and opens the button sources. In --dev
// the input is a FIFO in the state directory, made 0600 here.
func (g *Gateway) openPairing(cfg config.Config) error {
	p := &pairingSvc{g: g, events: make(chan button.Event),
		pake: map[string]*pakeRun{}, pending: map[string]*pendingEnrol{}, derived: map[string]string{}, idevWindow: map[string]time.Time{}, estChange: make(chan struct{}, 1),
		refusalAudit: ratelog.New(pairingRefusalAuditEvery), refusalLines: ratelog.New(pairingRefusalLogEvery), sweepEvery: expectSweepEvery}
	p.renew = renewals{store: g.store, last: map[string]renewal{}, byNew: map[string]replaced{}}
	p.estAddr.Store("")
	clk := g.opts.PairingClock
	if clk == nil {
		clk = clock.Real{}
	}
	var err error
	p.win, err = pairing.New(pairing.Config{Duration: cfg.Pairing.Window.D()}, p.events, clk, p.audit, g.metrics.reg, g.log)
	if err != nil {
		return fmt.Errorf("pairing: %w", err)
	}
	if p.codes, err = pairing.NewCodes(pairing.GatewayProver, spake2plus.DefaultKDFParams, clk, p.audit); err != nil {
		return fmt.Errorf("pairing: %w", err)
	}
	p.enroller = &pairing.Enroller{Window: p.win, Codes: p.codes, GatewayID: cfg.GatewayID, Rand: rand.Reader}
	p.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "bastion", Subsystem: "pairing", Name: "sessions_refused_total",
		Help: "Enrollment sessions refused at the handshake (DTLS, and TLS on the EST port), by reason.",
	}, []string{"reason"})
	p.msgRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "bastion", Subsystem: "pairing", Name: "messages_refused_total",
		Help: "Messages of enrollment sessions (setup-code exchange, EST enrollment) refused, by reason.",
	}, []string{"reason"})
	for _, c := range []prometheus.Collector{p.refused, p.msgRefused} {
		if err := g.metrics.reg.Register(c); err != nil {
			return fmt.Errorf("pairing metrics: %w", err)
		}
	}
	if p.vendors, err = loadVendorRoots(cfg.Pairing.Vendors, g.log); err != nil {
		return err
	}
	g.pairing = p // before the sources: close() releases what was opened
	if err := p.openSources(cfg.Pairing); err != nil {
		return err
	}
	g.extraControl["POST /v1/pairing/expect"] = http.HandlerFunc(p.controlExpect)
	p.deleteExpiredCodes() // those that expired while the gateway was stopped
	g.addStatus("pairing", func() any {
		st := p.win.State()
		m := map[string]any{"open": st.Open, "failures": st.Failures, "buttons": len(p.sources), "vendors": len(p.vendorRoots())}
		if st.Open {
			m["closes"] = st.Deadline
			m["enrolling"] = st.Enrolling
		}
		if st.LastClose != nil {
			m["last_close"] = string(st.LastClose.Reason)
		}
		if a := p.ESTAddr(); a != "" {
			m["est_https"] = a
		}
		if e, ok := p.buttonErr.Load().(string); ok {
			m["button_error"] = e
		}
		return m
	})
	return nil
}

// loadVendorRoots reads the vendor root files of pairing.vendors. A
// certificate given to several vendors is warned about, not refused: no
// manufacturer certificate that chains to it can pair (vendorsOf finds
// several vendors, and its vendor is unknown), but the other vendors'
// devices can, and the gateway itself runs.
func loadVendorRoots(files map[string]string, log *slog.Logger) (map[string]*x509.CertPool, error) {
	roots := map[string]*x509.CertPool{}
	holders := map[string][]string{} // DER of a certificate → the vendors given it
	certs := map[string]*x509.Certificate{}
	for name, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("pairing.vendors.%s: %w", name, err)
		}
		pool := x509.NewCertPool()
		n := 0
		for rest := b; len(rest) > 0; {
			var blk *pem.Block
			if blk, rest = pem.Decode(rest); blk == nil {
				break
			}
			// What x509.CertPool.AppendCertsFromPEM takes, and skips.
			if blk.Type != "CERTIFICATE" || len(blk.Headers) != 0 {
				continue
			}
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				continue
			}
			pool.AddCert(c)
			n++
			if k := string(c.Raw); !slices.Contains(holders[k], name) {
				holders[k] = append(holders[k], name)
				certs[k] = c
			}
		}
		if n == 0 {
			return nil, fmt.Errorf("pairing.vendors.%s: %s holds no PEM certificate", name, file)
		}
		roots[name] = pool
	}
	var shared []string
	for k, names := range holders {
		if len(names) > 1 {
			slices.Sort(names)
			shared = append(shared, k)
		}
	}
	slices.SortFunc(shared, func(a, b string) int {
		return cmp.Or(strings.Compare(strings.Join(holders[a], ","), strings.Join(holders[b], ",")), strings.Compare(a, b))
	})
	for _, k := range shared {
		sum := sha256.Sum256(certs[k].Raw)
		log.Warn("pairing.vendors: several vendors are given the same certificate; no device whose manufacturer certificate chains to it can pair, as its vendor is unknown: give each vendor only CA certificates that are its own (its issuing CA rather than a root it shares)",
			"vendors", strings.Join(holders[k], ", "), "certificate", certs[k].Subject.String(), "sha256", hex.EncodeToString(sum[:]))
	}
	return roots, nil
}

// setVendors puts roots (loadVendorRoots) in force: every manufacturer
// certificate checked from now on, in a window already open too, is
// checked against them, and an IDevID session accepted before under a
// root no longer there may not enroll (beginEnrol).
func (p *pairingSvc) setVendors(roots map[string]*x509.CertPool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.vendors = roots
}

// vendorRoots returns the vendor roots in force; the map is never changed,
// only replaced.
func (p *pairingSvc) vendorRoots() map[string]*x509.CertPool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.vendors
}

// vendorsOf names the configured vendors whose roots leaf chains to,
// through inter, sorted. More than one (a root configured for two
// vendors, or one vendor's CA that chains to another's root) leaves the
// device's vendor unknown: verifyIDevID refuses it rather than pick one,
// since the vendor recorded decides which vendor's firmware and manifest
// key the device gets.
func (p *pairingSvc) vendorsOf(leaf *x509.Certificate, inter *x509.CertPool) []string {
	var names []string
	for name, pool := range p.vendorRoots() {
		if p.chainsTo(leaf, inter, pool) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

// chainsTo reports whether leaf chains to roots through inter at the
// gateway's time.
func (p *pairingSvc) chainsTo(leaf *x509.Certificate, inter, roots *x509.CertPool) bool {
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: p.g.clock.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}

func (p *pairingSvc) openSources(pc config.Pairing) error {
	layout := button.NativeLayout()
	switch pc.Layout {
	case "64":
		layout = button.Layout64
	case "32":
		layout = button.Layout32
	}
	if pc.Input == "auto" {
		src, err := button.OpenAutoInput("/dev/input", uint16(pc.KeyCode), layout, 2*time.Second, p.g.log.With("component", "button"))
		if err != nil {
			return fmt.Errorf("pairing.input auto: %w", err)
		}
		p.sources = append(p.sources, src)
	} else if pc.Input != "" {
		src, err := openInput(pc.Input, uint16(pc.KeyCode), layout, p.g.opts.Dev)
		if err != nil {
			return err
		}
		p.sources = append(p.sources, src)
	}
	if pc.GPIOChip != "" {
		src, err := button.OpenGPIO(pc.GPIOChip, uint32(pc.GPIOLine), button.GPIOConfig{ActiveLow: true, Bias: button.BiasPullUp})
		if err != nil {
			return fmt.Errorf("pairing.gpio_chip: %w", err)
		}
		p.sources = append(p.sources, src)
	}
	for _, s := range p.sources {
		// Debounce is about the real signal: always the real clock.
		w, err := button.NewWatcher(s, button.Config{}, clock.Real{}, p.g.log)
		if err != nil {
			return err
		}
		p.watchers = append(p.watchers, w)
	}
	if len(p.sources) == 0 {
		p.g.log.Warn("pairing: no button configured (pairing.input, pairing.gpio_chip): no device can be paired")
	}
	return nil
}

// openInput opens an evdev node or a FIFO. A FIFO is opened read-write so
// that opening does not wait for a writer and a writer closing is no EOF;
// in dev mode a missing one is made, 0600, in the 0700 state directory.
func openInput(path string, code uint16, l button.Layout, dev bool) (button.Source, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) && dev {
		if err := syscall.Mkfifo(path, 0o600); err != nil {
			return nil, fmt.Errorf("pairing.input: make FIFO %s: %w", path, err)
		}
		fi, err = os.Stat(path)
	}
	if err != nil {
		return nil, fmt.Errorf("pairing.input %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeNamedPipe == 0 {
		return button.OpenInput(path, code, l)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("pairing.input %s: FIFO mode %v lets others press the button: chmod 600 it", path, fi.Mode().Perm())
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("pairing.input: open FIFO %s: %w", path, err)
	}
	s, err := button.NewInputSource(f, code, l)
	if err != nil {
		f.Close()
		return nil, err
	}
	return s, nil
}

// summary is the start-up line about pairing.
func (p *pairingSvc) summary(w io.Writer) {
	pc := p.g.cfg.Load().Pairing
	switch {
	case len(p.sources) == 0:
		fmt.Fprintf(w, "  pairing:  no button configured (pairing.input / pairing.gpio_chip): devices cannot be paired\n")
	case p.g.opts.Dev && pc.Input != "" && pc.Input != "auto":
		fmt.Fprintf(w, "  pairing:  button is %s (press: devicesim press-button --fifo %s --hold 1.5s)\n", pc.Input, pc.Input)
	default:
		fmt.Fprintf(w, "  pairing:  press the box's pairing button 1-10 s to open a %v window\n", pc.Window.D())
	}
}

// run starts the window and the watchers in the gateway's errgroup.
func (p *pairingSvc) run(ctx context.Context, eg *errgroup.Group) {
	eg.Go(func() error { return p.win.Run(ctx) })
	eg.Go(func() error {
		p.sweepExpiredCodes(ctx)
		return nil
	})
	if p.g.cfg.Load().Pairing.ESTListen != "" {
		eg.Go(func() error { return p.runEST(ctx) })
	}
	for _, w := range p.watchers {
		eg.Go(func() error {
			// A button that goes away (an unplugged input device) stops
			// pairing, not the gateway: devices already paired keep working.
			if err := w.Run(ctx, p.events); err != nil {
				p.buttonErr.Store(err.Error())
				p.g.log.Error("pairing: button source stopped; no device can be paired until the gateway restarts", "err", err)
				p.event("system", "pairing.button_failed", "", err.Error())
			}
			return nil
		})
	}
}

// sweepExpiredCodes deletes the expired setup codes every sweepEvery
// until ctx ends: an expired code is of no use, but it is the label's
// secret in clear, and nothing else deletes it unless a device says hello
// (expectedFor) or someone opens the console's pairing page.
func (p *pairingSvc) sweepExpiredCodes(ctx context.Context) {
	t := time.NewTicker(p.sweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			p.deleteExpiredCodes()
		}
	}
}

// deleteExpiredCodes deletes the setup codes expired by the gateway's
// clock (which expectedFor judges them by) from the store.
func (p *pairingSvc) deleteExpiredCodes() {
	gone, err := p.g.store.DeleteExpiredExpected(p.g.clock.Now())
	if err != nil {
		p.g.log.Warn("pairing: expired setup codes could not be deleted; they stay unused, and are tried again within a minute", "err", err)
		return
	}
	for _, e := range gone {
		p.g.log.Info("pairing: expired setup code deleted", "expected", e.ID, "name", e.Name, "expired", e.Expires.UTC().Format(time.RFC3339))
	}
}

// close runs after every goroutine of run has returned, the store still
// open: it writes the refusal counts held (no window was open to write
// them as it closed), then releases the sources.
func (p *pairingSvc) close() {
	p.flushRefusals("as the gateway stopped")
	for _, s := range p.sources {
		if c, ok := s.(interface{ Close() error }); ok {
			c.Close()
		}
	}
}

// audit writes a window step to the audit log. It runs on the goroutine
// that made the step, never with p.mu held (see mu).
func (p *pairingSvc) audit(e pairing.AuditEvent) {
	if e.Refusal != "" {
		// An attempt a peer can repeat at will (a session from an earlier
		// window): counted by the window, spaced here.
		p.refusal("enrollment attempt refused", string(e.Step), e.Refusal, e.Device, e.Detail)
		return
	}
	if e.Step == pairing.StepOpened || e.Step == pairing.StepClosed {
		p.estKick()
		p.flushRefusals("as the window " + strings.TrimPrefix(string(e.Step), "pairing.window_"))
		// On the box's own screen too (the appliance shows the journal):
		// whoever pressed the button sees that it worked.
		p.g.log.Info("pairing window "+strings.TrimPrefix(string(e.Step), "pairing.window_"), "reason", e.Reason, "detail", e.Detail)
	}
	if e.Step == pairing.StepClosed {
		// What the window's sessions did ends with it, and so do the
		// sessions themselves.
		p.mu.Lock()
		clear(p.idevWindow)
		clear(p.pake)
		clear(p.pending)
		ends := p.onEnd
		p.mu.Unlock()
		// The session of a device that enrolled is kept: its answer, with
		// its credentials, is still to be sent.
		kept := ""
		if e.Reason == pairing.ReasonEnrolled {
			kept = idEnroll + e.Device
			if strings.HasPrefix(e.Device, idIDevID) {
				kept = e.Device
			}
		}
		for _, f := range ends {
			f(kept)
		}
	}
	if e.Step == pairing.StepLongPressIdle {
		p.recoveryCode()
	}
	actor := "pairing"
	if e.Step == pairing.StepOpened || e.Reason == pairing.ReasonCancelled || e.Step == pairing.StepLongPressIdle {
		actor = "button"
	}
	detail := e.Detail
	if e.Reason != "" {
		detail = strings.TrimSpace(string(e.Reason) + "; " + detail)
	}
	if e.Alert {
		detail = "ALERT: " + detail
	}
	p.event(actor, string(e.Step), e.Device, detail)
}

// recoveryCode answers a long press of the button with no window open: a
// one-time console password recovery code, valid 15 minutes, written to the
// log, which only the box shows (its screen and serial console on the
// appliance; root's logread on a router), never the network. Holding the
// button that long is the physical presence the recovery needs; the code
// itself is entered on the console's recovery page.
func (p *pairingSvc) recoveryCode() {
	h := p.g.consoleHandler
	if h == nil {
		p.g.log.Warn("long press of the pairing button: no console recovery code, the console is off")
		return
	}
	code, err := h.NewRecoveryCodeFor("button")
	if err != nil {
		p.g.log.Error("long press of the pairing button: console recovery code", "err", err)
		return
	}
	p.g.log.Warn("console recovery code: "+code+" (valid 15 minutes, once): enter it on the console's password recovery page", "source", "pairing button held 10 s or more with no window open")
}

func (p *pairingSvc) event(actor, action, target, detail string) {
	st := p.g.store
	if st == nil {
		return
	}
	if _, err := st.Audit(store.Event{Time: p.g.clock.Now(), Actor: actor, Action: action, Target: target, Detail: detail}); err != nil {
		p.g.log.Error("audit log write failed", "action", action, "err", err)
	}
}

// refuse counts, audits and logs a refused enrollment session (the audit
// and the log spaced: refusal) and returns the handshake's error. device
// is what the peer claims, unauthenticated.
func (p *pairingSvc) refuse(reason, device, detail string) error {
	p.refused.WithLabelValues(reason).Inc()
	p.refusal("session refused", "pairing.session_refused", reason, device, detail)
	return &pairingRefusal{msg: fmt.Sprintf("pairing session for %q refused: %s", ratelog.Clip(device, maxPairingClaim), detail)}
}

// pairingRefusal is refuse's error: its text, and bridges.ErrPairingRefused
// for the transports, which count it as such (not as a wrong credential).
type pairingRefusal struct{ msg string }

func (e *pairingRefusal) Error() string        { return e.msg }
func (e *pairingRefusal) Is(target error) bool { return target == bridges.ErrPairingRefused }

// psk recognises the enrollment PSK identities; ok is false for any other
// identity (an operational PSK).
func (p *pairingSvc) psk(identity []byte) (device string, key []byte, err error, ok bool) {
	if p == nil {
		return "", nil, nil, false
	}
	prefix, id := pairing.SplitIdentity(string(identity))
	switch {
	case prefix == "":
		return "", nil, nil, false
	case id == "" || len(id) > 128:
		return "", nil, p.refuse("bad identity", id, "enrollment identity without a usable device id"), true
	case !p.win.IsOpen():
		return "", nil, p.refuse("no window", id, "no pairing window is open: press the gateway's button first"), true
	case prefix == pairing.PAKEIdentityPrefix:
		return idPAKE + id, pairing.PublicPAKEPSK(id), nil, true
	}
	p.mu.Lock()
	pe := p.pending[id]
	p.mu.Unlock()
	if pe == nil || p.win.State().Enrolling != id {
		return "", nil, p.refuse("no exchange", id, "no setup-code exchange completed for this device in the open window"), true
	}
	return idEnroll + id, pe.psk, nil, true
}

// verifyIDevID accepts a manufacturer certificate chaining to a configured
// vendor root, only while the window is open, for an enrollment session.
// caErr is why the gateway's own CA refused the chain: it stays the answer
// for anything that is not an enrollment, so refusal reasons keep their
// meaning.
func (p *pairingSvc) verifyIDevID(raw [][]byte, caErr error) (string, error) {
	if len(raw) == 0 {
		return "", caErr
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return "", caErr
	}
	inter := x509.NewCertPool()
	for _, r := range raw[1:] {
		if c, err := x509.ParseCertificate(r); err == nil {
			inter.AddCert(c)
		}
	}
	vendors := p.vendorsOf(leaf, inter)
	// One reading of the window, before p.mu: a reading may close it (its
	// deadline passed), which audits the close, and p.audit takes p.mu.
	st := p.win.State()
	open := st.Open
	claim := leaf.Subject.CommonName
	switch {
	case len(vendors) == 0 && open:
		p.refuse("unknown vendor", claim, "certificate chains neither to this gateway's CA nor to a configured vendor root (pairing.vendors)")
		return "", caErr
	case len(vendors) == 0:
		return "", caErr
	case !open:
		return "", p.refuse("no window", claim, "manufacturer certificate of "+strings.Join(vendors, " or ")+" outside a pairing window: press the gateway's button first")
	case len(vendors) > 1:
		return "", p.refuse("ambiguous vendor", claim, "certificate chains to the roots of several vendors in pairing.vendors ("+strings.Join(vendors, ", ")+
			"), so its vendor is unknown: give each vendor only CA certificates that are its own (its issuing CA rather than a root it shares)")
	}
	vendor := vendors[0]
	sum := sha256.Sum256(leaf.Raw)
	dev := idIDevID + vendor + ":" + hex.EncodeToString(sum[:8])
	// The session belongs to this window: one kept open into a later
	// window may not enroll there without a new handshake.
	p.mu.Lock()
	p.idevWindow[dev] = st.OpenedAt
	p.mu.Unlock()
	return dev, nil
}

// coapIdentity is the identity the CoAP listeners use: the gateway's, plus
// manufacturer certificates for enrollment sessions. MQTT does not get
// the latter: it has no enrollment resources.
type coapIdentity struct {
	*identity
	p *pairingSvc
}

func (c coapIdentity) VerifyCert(raw [][]byte) (string, error) {
	dev, err := c.identity.VerifyCert(raw)
	if err == nil || errors.Is(err, pki.ErrRevoked) || c.p == nil {
		return dev, err
	}
	idev, ierr := c.p.verifyIDevID(raw, err)
	if ierr == err {
		return dev, err
	}
	return idev, ierr
}

func (g *Gateway) coapIdentity(id *identity) bridges.Identity {
	return coapIdentity{identity: id, p: g.pairing}
}

// coapEnrollment is the Enrollment the CoAP server gets (nil interface if
// pairing is not wired).
func (g *Gateway) coapEnrollment() coap.Enrollment {
	if g.pairing == nil {
		return nil
	}
	return g.pairing
}

// Kind classifies session identities for the CoAP server.
func (p *pairingSvc) Kind(device string) coap.Kind {
	switch {
	case strings.HasPrefix(device, idPAKE):
		return coap.KindPAKE
	case strings.HasPrefix(device, idEnroll), strings.HasPrefix(device, idIDevID):
		return coap.KindEnroll
	case strings.Contains(device, ":"):
		return coap.KindNone
	}
	return coap.KindDevice
}

// OnEnrollmentEnd has f called when the window closes (coap.EnrollmentEnd):
// the enrollment sessions it admitted end with it, but the session identity
// kept (the device that enrolled). Call it before Run.
func (p *pairingSvc) OnEnrollmentEnd(f func(kept string)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.onEnd = append(p.onEnd, f)
}

// errNoWindow answers an enrollment session's message when no window is
// open (the session is from an earlier one).
var errNoWindow = errors.New("no pairing window is open: press the gateway's button, then start again")

// refuseMessage counts, audits and logs (both spaced) a refused message of
// an enrollment session, a PAKE message or an enrollment request.
func (p *pairingSvc) refuseMessage(msg, reason, device, detail string) {
	p.msgRefused.WithLabelValues(reason).Inc()
	p.refusal(msg, "pairing.message_refused", reason, device, detail)
}

// PAKE runs one round of the setup-code exchange.
func (p *pairingSvc) PAKE(ctx context.Context, device string, msg []byte) ([]byte, error) {
	id := strings.TrimPrefix(device, idPAKE)
	// Before any work and before pakeMu: a session kept from an earlier
	// window can send at the rate it likes.
	if !p.win.IsOpen() {
		p.refuseMessage("PAKE message refused", "no window", id, "PAKE message with no pairing window open (a session from an earlier window)")
		return nil, errNoWindow
	}
	p.pakeMu.Lock()
	defer p.pakeMu.Unlock()
	var m pairing.PAKEMessage
	if err := m.UnmarshalBinary(msg); err != nil {
		p.refuseMessage("PAKE message refused", "malformed", id, err.Error())
		return nil, err
	}
	switch m.Type {
	case pairing.MsgHello:
		if string(m.ID) != id {
			p.refuseMessage("PAKE message refused", "hello for another device", id, "hello names another device than the session")
			return nil, fmt.Errorf("hello for %q in the session of %q", ratelog.Clip(string(m.ID), maxPairingClaim), id)
		}
		exp, err := p.expectedFor(id)
		// Hello below aborts the window for an overlap: no need to derive
		// a code for it, nor to report a missing one.
		enrolling := p.win.State().Enrolling
		overlap := enrolling != "" && enrolling != id
		if err == nil && !p.isDerived(id, exp) {
			if overlap {
				// The overlapping attempt may yet end before Hello runs:
				// whatever older code the book holds for id must not
				// answer in its place.
				p.forgetCode(id, "the store expects another code for this device")
			} else {
				err = p.registerCode(id, exp)
			}
		}
		if err != nil {
			// The store gives no usable code for id: a record an earlier
			// hello derived for it (a code withdrawn since, or chosen when
			// fewer devices were expected) must not answer in its place.
			p.forgetCode(id, "no usable setup code for this device in the store (withdrawn, expired, several expected, or not registrable)")
		}
		if err != nil && !overlap {
			// Anyone in the LAN can send hellos in the window: spaced.
			reason := "no setup code"
			switch {
			case errors.Is(err, errSeveralExpected):
				reason = "several expected"
			case !errors.Is(err, pairing.ErrNoCode):
				reason = "store error"
			}
			p.refusal("no setup code for a hello", "pairing.setup_code_missing", reason, id, err.Error())
		}
		// Hello claims the window and fails the attempt when no code is
		// registered, so that an unknown device counts as a failure.
		s, reply, herr := p.enroller.Hello(msg)
		if herr != nil {
			return nil, herr
		}
		p.mu.Lock()
		p.pake[id] = &pakeRun{s: s, expected: exp}
		delete(p.pending, id)
		p.mu.Unlock()
		return reply, nil
	case pairing.MsgRound2:
		p.mu.Lock()
		run := p.pake[id]
		delete(p.pake, id)
		p.mu.Unlock()
		if run == nil {
			p.refuseMessage("PAKE message refused", "no hello", id, "round 2 without a hello in this window")
			return nil, errors.New("round 2 without a hello: start the exchange again")
		}
		reply, _, psk, err := run.s.Finish(msg)
		if err != nil {
			return nil, err
		}
		if p.win.State().Enrolling != id {
			return nil, fmt.Errorf("enroll %s: %w", id, pairing.ErrAttemptOver)
		}
		p.mu.Lock()
		p.pending[id] = &pendingEnrol{s: run.s, psk: psk, expected: run.expected}
		p.mu.Unlock()
		p.event("pairing", "pairing.pake_done", id, "setup code proved; enrollment session keyed")
		return reply, nil
	}
	return nil, fmt.Errorf("%w: unexpected message type %d", pairing.ErrMalformedPAKE, m.Type)
}

// The expected devices in the store are the truth about setup codes; the
// code book (pairing.Codes) is only a cache of their scrypt derivations,
// by label id. It is reconciled with the store for the hello's label id at
// every hello, under pakeMu, just before Enroller.Hello looks that id up:
// the book keeps the record when it holds the code the store names for id,
// derives it when it does not, and forgets it when the store names none.
// Lookups happen only there, so a record for any other id is never used
// before its own hello reconciles it. Rebuilding the whole book from the
// store at each hello would give nothing more and cost a derivation (32 MiB
// of scrypt) per expected device per hello. An enrollment forgets every
// copy of the code it spent (forgetSpent) so that no key material of a
// used code stays behind.

func derivedKey(e store.ExpectedDevice) string {
	h := sha256.Sum256([]byte(e.ID + "\x00" + e.Code))
	return string(h[:])
}

// isDerived reports whether the code book holds e's code for id already.
func (p *pairingSvc) isDerived(id string, e store.ExpectedDevice) bool {
	p.mu.Lock()
	held := p.derived[id]
	p.mu.Unlock()
	if held != derivedKey(e) {
		return false
	}
	for _, c := range p.codes.List() {
		if c.Device == id {
			return true
		}
	}
	return false
}

// registerCode derives e's code into the book for label id. On failure
// the book may still hold an older code for id: the caller forgets it.
func (p *pairingSvc) registerCode(id string, e store.ExpectedDevice) error {
	code := []byte(e.Code)
	ttl := time.Until(e.Expires)
	if ttl <= 0 || ttl > pairing.MaxCodeTTL {
		ttl = pairing.DefaultTTL
	}
	if err := p.codes.Register(id, code, ttl); err != nil {
		return err
	}
	p.mu.Lock()
	p.derived[id] = derivedKey(e)
	p.mu.Unlock()
	return nil
}

// forgetCode removes label id's record from the code book.
func (p *pairingSvc) forgetCode(id, why string) {
	p.mu.Lock()
	delete(p.derived, id)
	p.mu.Unlock()
	p.codes.Remove(id, why)
}

// forgetSpent removes from the code book every record of the code whose
// derivedKey is spent, under whatever label id an earlier hello derived
// it: while one device is expected, any label id may use its code.
func (p *pairingSvc) forgetSpent(spent, enrolled string) {
	var ids []string
	p.mu.Lock()
	for id, k := range p.derived {
		if k == spent {
			ids = append(ids, id)
			delete(p.derived, id)
		}
	}
	p.mu.Unlock()
	for _, id := range ids {
		p.codes.Remove(id, "setup code spent by the enrollment of "+enrolled)
	}
}

// expectedFor picks the setup code registered for device: the expected
// device named like the device's label id, else the only one expected.
func (p *pairingSvc) expectedFor(id string) (store.ExpectedDevice, error) {
	p.deleteExpiredCodes()
	es, err := p.g.store.ExpectedDevices()
	if err != nil {
		return store.ExpectedDevice{}, err
	}
	now := p.g.clock.Now()
	var live []store.ExpectedDevice
	for _, e := range es {
		if now.Before(e.Expires) {
			live = append(live, e)
		}
	}
	for _, e := range live {
		if e.Name == id {
			return e, nil
		}
	}
	switch len(live) {
	case 0:
		return store.ExpectedDevice{}, pairing.ErrNoCode
	case 1:
		return live[0], nil
	}
	return store.ExpectedDevice{}, fmt.Errorf("%w: %d devices are expected and none is named %q: name the expected device by the id on its label, or pair one at a time", errSeveralExpected, len(live), id)
}

// errSeveralExpected: more than one device is expected and none is named
// like the one that said hello.
var errSeveralExpected = errors.New("no setup code chosen")

// caIssuer adapts the CA to est.Issuer.
type caIssuer struct{ g *Gateway }

func (c caIssuer) IssueDevice(ctx context.Context, csr *x509.CertificateRequest, id string) (*x509.Certificate, error) {
	return c.g.ca.IssueDevice(csr, id, c.g.cfg.Load().PKI.DeviceCertValidity.D())
}

func (c caIssuer) Chain() []*x509.Certificate { return c.g.ca.Chain() }

func estRefuse(code est.Code, err error) est.Response {
	return est.Response{Code: code, ContentFormat: est.NoFormat, Payload: []byte(err.Error()), Err: err}
}

// EST answers EST-coaps: /crts and /sren for operational sessions, /crts
// and /sen for enrollment sessions. /sen commits the window's attempt
// before the certificate leaves, and records the device.
func (p *pairingSvc) EST(ctx context.Context, device string, kind coap.Kind, peer []*x509.Certificate, r est.Request) est.Response {
	h := est.Handler{Issuer: caIssuer{p.g}}
	if kind == coap.KindDevice || r.Path == est.PathCrts {
		if r.Path == est.PathSren {
			if len(peer) == 0 {
				return estRefuse(est.Unauthorized, errors.New("renewal needs the current operational certificate: use the certificate listener"))
			}
			r.Peer, r.DeviceID = peer[0], device
			return p.renewCert(ctx, h, device, r)
		}
		return h.Handle(ctx, r)
	}
	// Enrollment (/sen) in a KindEnroll session.
	if err := p.enrolOpen(device); err != nil {
		return estRefuse(est.Forbidden, err)
	}
	en, err := p.beginEnrol(device, peer)
	if err != nil {
		return estRefuse(est.Forbidden, err)
	}
	r.DeviceID = en.opID
	resp := h.Handle(ctx, r)
	if resp.Issued == nil {
		en.fail("EST enrollment refused: " + errString(resp.Err))
		return resp
	}
	if err := p.finishEnrol(en, store.Device{Auth: "cert"}, resp.Issued); err != nil {
		return estRefuse(est.Forbidden, err)
	}
	return resp
}

// enrolment is one device's enrollment in progress, whichever way it
// proved itself.
type enrolment struct {
	opID                                    string // its operational device id
	commit                                  func() error
	fail                                    func(string)
	name, vendor, model, method, expectedID string
	label                                   string // setup-code label id
	spent                                   string // derivedKey of the setup code used
}

// enrolOpen refuses, before any work, an enrollment request of a session
// from an earlier window, which can send at the rate it likes.
func (p *pairingSvc) enrolOpen(device string) error {
	if p.win.IsOpen() {
		return nil
	}
	p.refuseMessage("enrollment request refused", "no window", device, "enrollment request with no pairing window open (a session from an earlier window)")
	return errNoWindow
}

// beginEnrol finds (setup code) or claims (IDevID) the window's attempt
// for the device of a KindEnroll session.
func (p *pairingSvc) beginEnrol(device string, peer []*x509.Certificate) (*enrolment, error) {
	en := &enrolment{opID: pki.NewDeviceID()}
	switch {
	case strings.HasPrefix(device, idEnroll):
		id := strings.TrimPrefix(device, idEnroll)
		p.mu.Lock()
		pe := p.pending[id]
		p.mu.Unlock()
		if pe == nil {
			return nil, errors.New("no setup-code exchange completed for this device in the open window")
		}
		en.commit, en.fail = pe.s.Succeed, pe.s.Attempt().Fail
		en.name, en.method, en.expectedID, en.label = pe.expected.Name, "setup-code", pe.expected.ID, id
		en.spent = derivedKey(pe.expected)
		if en.name == "" {
			en.name = id
		}
	case strings.HasPrefix(device, idIDevID) && len(peer) > 0:
		p.mu.Lock()
		seen := p.idevWindow[device]
		p.mu.Unlock()
		if st := p.win.State(); st.Open && !seen.Equal(st.OpenedAt) {
			p.refusal("enrollment refused", "pairing.session_refused", "earlier window", device, "enrollment session from an earlier window")
			return nil, errors.New("this session was opened in an earlier pairing window: reconnect")
		}
		// The session was accepted with the roots then in force; a reload
		// since may have removed its vendor's root (a compromised one), or
		// given its chain to another vendor too (verifyIDevID refuses such
		// a chain: the vendor recorded decides the device's firmware).
		en.vendor, _, _ = strings.Cut(strings.TrimPrefix(device, idIDevID), ":")
		inter := x509.NewCertPool()
		for _, c := range peer[1:] {
			inter.AddCert(c)
		}
		vendors := p.vendorsOf(peer[0], inter)
		if !slices.Contains(vendors, en.vendor) {
			p.refusal("enrollment refused", "pairing.session_refused", "unknown vendor", device, "manufacturer certificate no longer chains to a root of "+en.vendor+" in pairing.vendors (changed by a reload)")
			return nil, errors.New("the manufacturer certificate's vendor root is no longer configured on this gateway")
		}
		if len(vendors) > 1 {
			p.refusal("enrollment refused", "pairing.session_refused", "ambiguous vendor", device, "manufacturer certificate now chains to the roots of several vendors in pairing.vendors ("+
				strings.Join(vendors, ", ")+", changed by a reload), so its vendor is unknown")
			return nil, errors.New("the manufacturer certificate chains to several vendors configured on this gateway since a reload, so its vendor is unknown")
		}
		a, err := p.win.Begin(device)
		if err != nil {
			return nil, err
		}
		en.commit, en.fail = a.Succeed, a.Fail
		en.model = peer[0].Subject.CommonName
		if en.model == "" {
			en.model = peer[0].Subject.SerialNumber
		}
		en.name, en.method = en.vendor+" "+en.model, "idevid"
	default:
		return nil, errors.New("this session may not enroll")
	}
	return en, nil
}

// finishEnrol commits the attempt (closing the window) before credentials
// leave, then records the device. cert is nil for a PSK device.
func (p *pairingSvc) finishEnrol(en *enrolment, dev store.Device, cert *x509.Certificate) error {
	if en.expectedID != "" {
		// The store decided at the hello; a code withdrawn since, in the
		// seconds the exchange takes, still must not enroll.
		if err := p.stillExpected(en.expectedID); err != nil {
			en.fail("setup code no longer expected")
			return fmt.Errorf("credentials withheld: %w", err)
		}
	}
	if err := en.commit(); err != nil {
		return fmt.Errorf("credentials withheld: %w", err)
	}
	p.mu.Lock()
	delete(p.pending, en.label)
	p.mu.Unlock()
	if en.expectedID != "" {
		// The code has served its one purpose: the store, which decides at
		// every hello, no longer offers it, and no copy of it stays in the
		// book. The device has enrolled already: a store error is logged.
		if err := p.g.store.DeleteExpectedDevice(en.expectedID); err != nil && !errors.Is(err, store.ErrNotFound) {
			p.g.log.Error("pairing: the spent setup code is still expected: withdraw it in the console", "device", en.opID, "expected", en.expectedID, "err", err)
		}
		p.forgetSpent(en.spent, en.opID)
	}
	dev.ID, dev.Name, dev.Vendor, dev.Model = en.opID, en.name, en.vendor, en.model
	if err := p.g.devices.enrolled(dev, cert, en.method); err != nil {
		p.g.log.Error("pairing: enrolled device not recorded", "device", en.opID, "err", err)
		return fmt.Errorf("device record: %w", err)
	}
	return nil
}

// stillExpected reports why the expected device id may no longer enroll.
func (p *pairingSvc) stillExpected(id string) error {
	es, err := p.g.store.ExpectedDevices()
	if err != nil {
		return fmt.Errorf("check the setup code is still expected: %w", err)
	}
	for _, e := range es {
		if e.ID == id {
			return nil
		}
	}
	return errors.New("the setup code was withdrawn during the exchange: register it again in the console, then pair again")
}

// EnrollPSK gives a PSK-only device an operational PSK instead of a
// certificate.
func (p *pairingSvc) EnrollPSK(ctx context.Context, device string) ([]byte, error) {
	if err := p.enrolOpen(device); err != nil {
		return nil, err
	}
	en, err := p.beginEnrol(device, nil)
	if err != nil {
		return nil, err
	}
	dev := store.Device{Auth: "psk", PSKIdentity: pki.NewPSKIdentity()}
	if err := p.finishEnrol(en, dev, nil); err != nil {
		return nil, err
	}
	return json.Marshal(map[string]string{"id": en.opID, "psk_identity": dev.PSKIdentity, "psk": hex.EncodeToString(p.g.ca.PSK(dev.PSKIdentity))})
}

// enrolled records a device that enrolled in a pairing window: the same
// record and audit as Add, so revocation works the same way.
func (d *Devices) enrolled(dev store.Device, cert *x509.Certificate, method string) error {
	dev.Created = d.ca.Clock().Now()
	if !validName(dev.Name) {
		dev.Name = dev.ID
	}
	if cert != nil {
		if err := d.store.RecordCert(store.Cert{Serial: pki.Serial(cert), Device: dev.ID, NotAfter: cert.NotAfter}); err != nil {
			return err
		}
	}
	err := d.store.AddDevice(dev)
	if errors.Is(err, store.ErrNameTaken) {
		dev.Name = dev.Name + " (" + dev.ID + ")"
		err = d.store.AddDevice(dev)
	}
	if err != nil {
		return err
	}
	d.audit(Actor{Name: "pairing"}, "device.add", dev.ID, "name="+strconv.Quote(dev.Name)+" auth="+dev.Auth+" method="+method+
		" vendor="+strconv.Quote(dev.Vendor)+" model="+strconv.Quote(dev.Model))
	d.log.Info("device enrolled in a pairing window", "device", dev.ID, "name", dev.Name, "auth", dev.Auth, "method", method, "vendor", dev.Vendor)
	return nil
}

// controlExpect registers a setup code over the control socket
// (bastionctl pairing expect): registration only, it opens nothing.
func (p *pairingSvc) controlExpect(w http.ResponseWriter, r *http.Request) {
	if ok, _ := r.Context().Value(peerKey{}).(bool); !ok {
		http.Error(w, "control socket: peer not allowed", http.StatusForbidden)
		return
	}
	var in struct {
		Name string `json:"name"`
		Code string `json:"code"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&in); err != nil {
		http.Error(w, "want JSON {name, code}: "+err.Error(), http.StatusBadRequest)
		return
	}
	code := strings.ReplaceAll(strings.TrimSpace(in.Code), " ", "")
	if !validName(in.Name) || len(code) < pairing.MinCodeLen || len(code) > pairing.MaxCodeLen {
		http.Error(w, "name: 1-64 printable characters; code: 8-64 characters as printed on the label", http.StatusBadRequest)
		return
	}
	now := p.g.clock.Now()
	e, err := p.g.store.ExpectDevice(store.ExpectedDevice{Name: in.Name, Code: code, Created: now, Expires: now.Add(pairing.DefaultTTL), By: "bastionctl"})
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	p.event("bastionctl", "pairing.expect", e.ID, "name="+strconv.Quote(in.Name))
	e.Code = ""
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(e)
}

// consolePairing shows the window and its history; it cannot open it.
type consolePairing struct{ p *pairingSvc }

func (c consolePairing) Window(ctx context.Context) (console.PairingWindow, error) {
	st := c.p.win.State()
	w := console.PairingWindow{Open: st.Open, Attempts: st.Failures, Available: len(c.p.sources) > 0}
	if st.Open {
		w.OpenedBy, w.Closes = "button", st.Deadline
	}
	return w, nil
}

func (c consolePairing) History(ctx context.Context, limit int) ([]console.PairingEvent, error) {
	es, err := c.p.g.store.AuditLog(20*limit, 0)
	if err != nil {
		return nil, err
	}
	var out []console.PairingEvent
	for _, e := range es {
		if len(out) >= limit {
			break
		}
		if !strings.HasPrefix(e.Action, "pairing.") && !(e.Action == "device.add" && e.Actor == "pairing") {
			continue
		}
		method := ""
		switch {
		case strings.Contains(e.Detail, "method=idevid") || strings.HasPrefix(e.Target, idIDevID):
			method = "idevid"
		case strings.Contains(e.Detail, "method=setup-code"), strings.HasPrefix(e.Action, "pairing.pake"), strings.HasPrefix(e.Action, "pairing.setup_code"):
			method = "setup-code"
		}
		res := strings.TrimPrefix(e.Action, "pairing.")
		if e.Detail != "" {
			res += ": " + e.Detail
		}
		out = append(out, console.PairingEvent{Time: e.Time, Device: e.Target, Method: method, Result: res})
	}
	return out, nil
}
