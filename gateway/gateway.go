package gateway

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base32"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/mqtt"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/buildinfo"
	"github.com/bastion-iot/bastion/internal/clock"
	"github.com/bastion-iot/bastion/internal/ratelog"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki"
)

// Options say how to run the gateway.
type Options struct {
	// ConfigPath is the configuration file. In dev mode it defaults to
	// bastion.yaml in the state directory and is written on first start.
	ConfigPath string
	// Dev runs everything on loopback with a local state directory and
	// prints the firewall plan instead of applying it.
	Dev bool
	// StateDir is the dev state directory (default ./bastion-dev).
	StateDir string
	// Log receives the structured log. Nil builds one on stderr from the
	// configured level and format.
	Log *slog.Logger
	// Out receives the few lines a person needs at start (addresses, setup
	// code). Nil means os.Stderr.
	Out io.Writer
	// Reload delivers SIGHUPs.
	Reload <-chan struct{}
	// Clock overrides the system clock (tests).
	Clock pki.Clock
	// Ready is called once every listener is up.
	Ready func(*Gateway)
	// PairingClock overrides the pairing window's clock (tests move it
	// instead of waiting out a window).
	PairingClock clock.Clock
	// Sink, if set, receives device telemetry before it is acknowledged
	// instead of the upstream link (tests). With neither, messages reach
	// local subscribers only (hub.LocalSink).
	Sink bridges.Sink
	// LANAddrs, if set, gives the addresses of the lan interface called
	// name, for the server certificates' names (tests): none for an
	// interface that is not there, an error if they could not be read.
	// Nil reads the system's.
	LANAddrs func(name string) ([]net.Addr, error)
}

// Gateway is one running Bastion.
type Gateway struct {
	opts       Options
	configPath string
	cfg        atomic.Pointer[config.Config]
	// reloadMu orders the writers of what Reload puts in force from the
	// configuration: the upstream link's settings (Reload and a console
	// rule change) and the firewall policy (Reload, and the EST port
	// opening and closing with a pairing window: estFirewall). Each reads
	// the configuration and applies what it built from it under reloadMu,
	// so none can apply settings or a policy built from a configuration a
	// concurrent reload has just replaced. Nothing that holds it waits
	// for a pairing window or for runEST.
	reloadMu sync.Mutex
	level    *slog.LevelVar
	log      *slog.Logger
	clock    pki.Clock
	store    *store.Store
	ca       *pki.CA
	devices  *Devices
	metrics  *metrics
	// secrets bounds the argon2id runs of MQTT secret logins (identity.go).
	secrets *secretChecker
	// certs are the listeners' server certificates, by listener name
	// (renewServerCerts).
	certs   map[string]listenerCert
	hub     *hub.Hub
	coap    *coap.Server
	mqtt    *mqtt.Server
	console *console.Server
	ctl     *controlServer
	fw      *firewall.Firewall
	// driftAudit spaces firewall.drift audit events (auditDrift).
	driftAudit *ratelog.Every
	firmware   *otacache.Cache
	// offers is the firmware announcer's work queue (firmware_serve.go).
	offers *offerQueue
	// iptablesOpts are given to firewall.NewIPTables; tests set InNetns,
	// so that the real backends act on a namespace the test made.
	iptablesOpts []firewall.IPTablesOption
	// firmwareHTTPS serves images to MQTT devices (firmware_serve.go).
	firmwareHTTPS *firmwareHTTPS
	queue         *queue.Queue
	parking       *queue.Queue // messages the broker refused for good
	upstream      *upstream.Upstream
	// rulesHeld: the last rules read for the link (forwardRules) were a
	// hold, as the console's rules or the opt-outs could not be read; the
	// console shows an alarm until they are read again.
	rulesHeld atomic.Bool
	pairing   *pairingSvc
	// consoleHandler is the console's pages and API (nil if disabled).
	consoleHandler *console.Handler
	// metricsLn is metrics.listen's, bound in New (nil when it is off).
	metricsLn net.Listener
	// sink takes device telemetry: the upstream link when there is one.
	sink     bridges.Sink
	downlink atomic.Pointer[func(context.Context, bridges.Message) error]
	started  time.Time
	// restoreMemLimit puts back the process's memory limit from before New.
	restoreMemLimit func()

	// extraControl lets components add control-socket endpoints.
	extraControl    map[string]http.Handler
	statusMu        sync.Mutex
	statusProviders map[string]func() any
	setupCode       string
}

// Run starts the gateway and blocks until ctx ends and everything has
// stopped, or until a component fails.
func Run(ctx context.Context, opts Options) error {
	g, err := New(opts)
	if err != nil {
		return err
	}
	return g.Run(ctx)
}

// New loads the configuration and opens the state: store, CA, listeners.
// Nothing is served until Run.
func New(opts Options) (_ *Gateway, err error) {
	g := &Gateway{opts: opts, level: new(slog.LevelVar), extraControl: map[string]http.Handler{}}
	if g.opts.Out == nil {
		g.opts.Out = os.Stderr
	}
	cfg, warnings, err := g.loadConfig()
	if err != nil {
		return nil, err
	}
	g.cfg.Store(&cfg)
	g.log = opts.Log
	if g.log == nil {
		g.log = newLogger(os.Stderr, cfg.Log, g.level)
	}
	g.logConfigWarnings(warnings)
	g.level.Set(parseLevel(cfg.Log.Level))
	g.restoreMemLimit = applyMemoryLimit(cfg.MemoryLimit, os.Getenv("GOMEMLIMIT"), os.Getenv("GOGC"), g.log)
	g.clock = opts.Clock
	if g.clock == nil {
		g.clock = pki.SystemClock{NotBefore: buildinfo.NotBefore()}
	}
	defer func() {
		if err != nil {
			g.close()
		}
	}()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory %s: %w", cfg.StateDir, err)
	}
	if err := os.Chmod(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory %s: %w", cfg.StateDir, err)
	}
	if g.store, err = store.Open(filepath.Join(cfg.StateDir, "bastion.db")); err != nil {
		return nil, err
	}
	g.metrics = newMetrics(g.activeDevices)
	g.secrets = newSecretChecker(secretCheckSlots, secretCheckWait)
	if err := g.waitForClock(context.Background(), 0); err != nil {
		return nil, err
	}
	if g.ca, err = pki.Open(filepath.Join(cfg.StateDir, "pki"), cfg.GatewayID, g.clock, g.log); err != nil {
		return nil, err
	}
	g.devices = &Devices{store: g.store, ca: g.ca, log: g.log,
		validity: func() time.Duration { return g.cfg.Load().PKI.DeviceCertValidity.D() },
		pskCoAPPort: func() int {
			if g.coap == nil {
				return 0
			}
			if _, a := g.coap.Addrs(); a != nil {
				return a.(*net.UDPAddr).Port
			}
			return 0
		}}
	if err := g.devices.loadRevocations(); err != nil {
		return nil, fmt.Errorf("load revocations: %w", err)
	}
	if err := g.openFirewall(context.Background(), cfg); err != nil {
		return nil, err
	}
	if err := g.openUpstream(cfg); err != nil {
		return nil, err
	}
	if err := g.openFirmware(cfg); err != nil {
		return nil, err
	}
	if err := g.openPairing(cfg); err != nil {
		return nil, err
	}
	if err := g.openMetrics(cfg); err != nil {
		return nil, err
	}
	if err := g.openListeners(cfg); err != nil {
		return nil, err
	}
	g.wireConsole()
	if g.ctl, err = newControlServer(g, control.SocketPath(cfg.StateDir)); err != nil {
		return nil, err
	}
	if err := g.prepareSetupCode(); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *Gateway) loadConfig() (config.Config, []*config.Error, error) {
	if !g.opts.Dev {
		g.configPath = g.opts.ConfigPath
		if g.configPath == "" {
			g.configPath = "/etc/bastion/bastion.yaml"
		}
		return config.LoadWithWarnings(g.configPath, config.Production())
	}
	dir := g.opts.StateDir
	if dir == "" {
		dir = "bastion-dev"
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return config.Config{}, nil, err
	}
	g.configPath = g.opts.ConfigPath
	if g.configPath == "" {
		g.configPath = filepath.Join(abs, "bastion.yaml")
	}
	if _, err := os.Stat(g.configPath); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(abs, 0o700); err != nil {
			return config.Config{}, nil, fmt.Errorf("state directory %s: %w", abs, err)
		}
		if err := WriteConfigFile(g.configPath, config.Dev(abs)); err != nil {
			return config.Config{}, nil, err
		}
	}
	return config.LoadWithWarnings(g.configPath, config.Dev(abs))
}

// WriteConfigFile writes a commented configuration file (0600) atomically
// and durably: after a power cut the path holds the old file or the whole
// new one, never an empty or partial one. The new file's data is synced
// before the rename (else the rename can reach the disk first, and ext4 or
// f2fs can leave a zero-length file), and the directory after it (else the
// rename itself can be lost).
func WriteConfigFile(path string, c config.Config) error {
	var b strings.Builder
	if err := config.WriteCommented(&b, c); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := writeSynced(tmp, []byte(b.String()), 0o600); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write config %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write config %s: %w", path, err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("write config %s: the file is written but may not survive a power cut: %w", path, err)
	}
	return nil
}

// writeSynced writes data to a new file with mode perm and syncs it to disk
// before closing it. A file left at name by an earlier write that stopped
// half-way is replaced, not reused: reusing it would keep its mode.
func writeSynced(name string, data []byte, perm os.FileMode) error {
	if err := os.Remove(name); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", name, err)
	}
	return f.Close()
}

// syncDir makes the renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// waitForClock blocks until the clock is plausible, saying so every
// interval. interval 0 means check once and fail.
func (g *Gateway) waitForClock(ctx context.Context, interval time.Duration) error {
	for {
		err := g.clock.Sane()
		if err == nil {
			g.metrics.clockSane.Set(1)
			return nil
		}
		g.metrics.clockSane.Set(0)
		g.log.Error("waiting for the clock: no certificate is accepted or issued until it is set", "err", err)
		if interval == 0 {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// serverSANs are the names the certificate of a listener on listen covers:
// pki.hostnames, the address it listens on, and the addresses the lan
// interfaces have now (renewServerCerts asks again every pass). The error
// says the addresses of a lan interface could not be read: the names are
// without them.
func (g *Gateway) serverSANs(cfg config.Config, listen string) ([]string, error) {
	sans := slices.Clone(cfg.PKI.Hostnames)
	if host, _, err := net.SplitHostPort(listen); err == nil && host != "" {
		if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
			sans = append(sans, ip.String())
		}
	}
	lanAddrs := g.opts.LANAddrs
	if lanAddrs == nil {
		lanAddrs = interfaceAddrs
	}
	// A box listening on every address answers on its lan interfaces' addresses.
	var errs []error
	for _, name := range cfg.Firewall.LAN {
		addrs, err := lanAddrs(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("addresses of lan interface %s: %w", name, err))
			continue
		}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLinkLocalUnicast() {
				sans = append(sans, ipn.IP.String())
			}
		}
	}
	if len(sans) == 0 {
		sans = append(sans, cfg.GatewayID+".local")
	}
	return sans, errors.Join(errs...)
}

// lanPrefixes are the prefixes of the lan interfaces' addresses now (the
// console serves a source in one). A lan interface whose addresses cannot
// be read adds none: its clients on global addresses are refused until
// they can be.
func (g *Gateway) lanPrefixes() []netip.Prefix {
	lanAddrs := g.opts.LANAddrs
	if lanAddrs == nil {
		lanAddrs = interfaceAddrs
	}
	var out []netip.Prefix
	for _, name := range g.cfg.Load().Firewall.LAN {
		addrs, err := lanAddrs(name)
		if err != nil {
			continue
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			ones, bits := ipn.Mask.Size()
			if !ok || bits == 0 {
				continue
			}
			ip = ip.Unmap()
			if ip.Is4() && bits == 128 {
				ones -= 96
			}
			out = append(out, netip.PrefixFrom(ip, ones).Masked())
		}
	}
	return out
}

// interfaceAddrs are the addresses of the interface called name, none if
// it is not there (yet: a bridge not created, a USB adapter not plugged).
// Not net.InterfaceByName, whose error for a missing interface is not
// told apart from a failure to read the interfaces.
func interfaceAddrs(name string) ([]net.Addr, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	// A name ending in "+" is every interface it starts (iptables' -i
	// wildcard, which firewall.lan accepts): all of theirs.
	prefix, wild := strings.CutSuffix(name, "+")
	var out []net.Addr
	for _, ifc := range ifs {
		if ifc.Name != name && !(wild && strings.HasPrefix(ifc.Name, prefix)) {
			continue
		}
		as, err := ifc.Addrs()
		if err != nil {
			return nil, err
		}
		out = append(out, as...)
	}
	return out, nil
}

// refreshServerCert re-issues sc, the certificate of the listener called
// name on listen, if it is due or its names (serverSANs) changed. When the
// lan's addresses cannot be read it only renews one that is due: a
// passing failure must not drop the addresses from the names, and every
// device that verifies the gateway by one of them with it.
func (g *Gateway) refreshServerCert(cfg config.Config, name, listen string, sc *pki.ServerCert) error {
	sans, err := g.serverSANs(cfg, listen)
	if err != nil {
		g.log.Warn("server certificate names not checked; it keeps those it has", "listener", name, "err", err)
		if !sc.Due() {
			return nil
		}
		return sc.Renew()
	}
	_, err = sc.Refresh(sans)
	return err
}

// listenerCert is a listener's server certificate and the address the
// listener was opened on, which its names include (serverSANs).
type listenerCert struct {
	cert   *pki.ServerCert
	listen string
}

// serverCertCheck is how often the server certificates are checked: due
// for renewal, or naming other addresses than the lan interfaces have.
// Often, because an address can come after the start (a box booted
// unplugged, a slow DHCP server; the appliance starts bastiond after at
// most 60 s without one) or change (a new lease, a new IPv6 prefix), and
// until the certificates name it a device that verifies the gateway by
// that address refuses it. A check that finds nothing to do reads the
// interfaces' addresses and nothing else.
const serverCertCheck = time.Minute

// runServerCertRenewal runs renewServerCerts every serverCertCheck until
// ctx ends. The first pass is one interval after the start: openListeners
// issued what was due, for the addresses there were.
func (g *Gateway) runServerCertRenewal(ctx context.Context) error {
	t := time.NewTicker(serverCertCheck)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		g.renewServerCerts()
	}
}

// renewServerCerts re-issues each listener's certificate that is due, or
// whose names (serverSANs, from the running configuration: firewall.lan is
// applied by a reload) are no longer those it covers. The listeners read
// their certificate through GetCertificate: the next handshake gets the
// new one, without a restart. A failure is logged and retried at the next
// pass; the old certificate is served until then.
func (g *Gateway) renewServerCerts() {
	cfg := g.cfg.Load()
	for _, name := range slices.Sorted(maps.Keys(g.certs)) {
		lc := g.certs[name]
		if err := g.refreshServerCert(*cfg, name, lc.listen, lc.cert); err != nil {
			g.log.Error("server certificate not renewed; the current one is served, retrying at the next check",
				"listener", name, "next_check", serverCertCheck, "err", err)
		}
	}
}

func (g *Gateway) openListeners(cfg config.Config) error {
	g.certs = map[string]listenerCert{}
	cert := func(name, listen string) (*pki.ServerCert, error) {
		sans, err := g.serverSANs(cfg, listen)
		if err != nil {
			g.log.Warn("server certificate names without the lan's addresses; the renewal pass checks them again", "listener", name, "err", err)
		}
		sc, err := g.ca.ServerCert(name, sans, cfg.PKI.ServerCertValidity.D(), cfg.PKI.RenewBefore.D())
		if err != nil {
			return nil, err
		}
		g.certs[name] = listenerCert{cert: sc, listen: listen}
		return sc, nil
	}
	id := g.identity()
	// Telemetry goes to the Sink a test gave, else the upstream link (which
	// applies the privacy rules, then the durable queue), else nowhere but
	// local subscribers.
	sink := g.opts.Sink
	if sink == nil {
		sink = g.sink
	}
	if sink == nil {
		sink = hub.LocalSink{}
	}
	var err error
	if g.hub, err = hub.New(sink, g.metrics.reg, g.log); err != nil {
		return err
	}
	// Commands from the cloud reach devices on whichever transport they use.
	g.setDownlink(g.hub.Downlink) // bridges.ErrNoReceiver: kept, no device session got it
	if cfg.CoAP.Enabled {
		sc, err := cert("coap", cfg.CoAP.Listen)
		if err != nil {
			return err
		}
		g.coap, err = coap.New(coap.Config{Listen: cfg.CoAP.Listen, PSKListen: cfg.CoAP.PSKListen, MaxPayload: cfg.CoAP.MaxPayload,
			Firmware: g.coapFirmware(), Enroll: g.coapEnrollment()}, sc, g.coapIdentity(id), g.hub, g.log)
		if err != nil {
			return err
		}
	}
	if cfg.MQTT.Enabled {
		sc, err := cert("mqtt", cfg.MQTT.Listen)
		if err != nil {
			return err
		}
		g.mqtt, err = mqtt.New(mqtt.Config{Listen: cfg.MQTT.Listen, AllowSecretAuth: cfg.MQTT.AllowSecretAuth,
			MaxPacketSize: cfg.MQTT.MaxPacketSize, WriteTimeout: cfg.MQTT.WriteTimeout.D(), MaxPayload: cfg.CoAP.MaxPayload, Retained: g.store,
			KeepRetained: g.keepRetained}, sc, id, g.hub, g.log)
		if err != nil {
			return err
		}
		if g.firmware != nil {
			// A device that subscribes after an announcement gets the offer
			// in force (MQTT offers are sent, not retained).
			if err := g.mqtt.OnSubscribed(g.offerSubscribed); err != nil {
				return err
			}
		}
	}
	// A revoked (or erased) device's last commands and traffic row go from
	// the hub whichever transports run. CoAP's revocation handler forgets
	// the device itself, but it runs only with coap.enabled, and MQTT's
	// does not: on an MQTT-only gateway an erased device's last-seen time,
	// counters and kept commands stayed until the restart. Subscribed
	// after the transports' handlers, so it runs once they have marked
	// the device's sessions ended (what such a session sends after that
	// is refused before it reaches the hub, which would remember the
	// device again). With CoAP on, the device is forgotten twice: harmless.
	id.OnRevoke(g.hub.Forget)
	// Once the transports exist (none serves yet): applying the opt-outs
	// also drops the MQTT broker's stored retained status reports.
	g.startOptOuts()
	if err := g.openFirmwareHTTPS(cfg, cert); err != nil {
		return err
	}
	g.addStatus("transports", func() any {
		st := map[string]int{}
		if g.coap != nil {
			st["coap_sessions"] = g.coap.SessionCount()
		}
		if g.mqtt != nil {
			st["mqtt_sessions"] = g.mqtt.SessionCount()
		}
		return st
	})
	if cfg.Console.Enabled {
		sc, err := cert("console", cfg.Console.Listen)
		if err != nil {
			return err
		}
		g.consoleHandler, err = console.NewHandler(console.Options{Store: g.store, Gateway: consoleBackend{g}, Log: g.log, Metrics: g.metrics.reg, LANPrefixes: g.lanPrefixes})
		if err != nil {
			return err
		}
		g.extraControl["POST /v1/console/recover"] = g.consoleHandler.RecoveryControlHandler()
		clog := g.log.With("component", "console")
		refusals := g.newHTTPSRefusals("console", "console", clog, slog.LevelDebug)
		g.console, err = console.New(cfg.Console.Listen, pki.TLSServer(sc, 0, nil), g.consoleHandler, g.log,
			refusals.errorLog(), refusals.refused)
		if err != nil {
			return err
		}
	}
	return nil
}

func (g *Gateway) identity() *identity {
	return &identity{ca: g.ca, store: g.store, m: g.metrics, pairing: g.pairing, secrets: g.secrets, log: g.log}
}

const metaSetupCode = "console.setup_code_sha256"
const metaAdminExists = "console.admin_exists"

// prepareSetupCode makes a fresh one-time code for creating the first
// console admin, as long as no admin exists. Only its hash is stored; the
// code itself is shown once, on the box's own console.
func (g *Gateway) prepareSetupCode() error {
	if _, err := g.store.Meta(metaAdminExists); err == nil {
		return nil
	}
	b := make([]byte, 10) // 80 bits
	rand.Read(b)
	s := base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b)
	g.setupCode = s[0:4] + "-" + s[4:8] + "-" + s[8:12] + "-" + s[12:16]
	sum := sha256.Sum256([]byte(g.setupCode))
	return g.store.SetMeta(metaSetupCode, []byte(hex.EncodeToString(sum[:])))
}

// CheckSetupCode reports whether code is the current first-admin setup
// code (constant time).
func (g *Gateway) CheckSetupCode(code string) bool {
	want, err := g.store.Meta(metaSetupCode)
	if err != nil {
		return false
	}
	sum := sha256.Sum256([]byte(strings.ToUpper(strings.TrimSpace(code))))
	return subtle.ConstantTimeCompare([]byte(hex.EncodeToString(sum[:])), want) == 1
}

// Run serves until ctx ends, then stops every component with a deadline.
func (g *Gateway) Run(ctx context.Context) error {
	defer g.close()
	g.started = time.Now()
	eg, ctx := errgroup.WithContext(ctx)
	if g.coap != nil {
		eg.Go(func() error { return g.coap.Run(ctx) })
	}
	if g.mqtt != nil {
		eg.Go(func() error { return g.mqtt.Run(ctx) })
	}
	if g.console != nil {
		eg.Go(func() error { return g.console.Run(ctx) })
	}
	eg.Go(func() error { return g.ctl.Run(ctx) })
	eg.Go(func() error { return g.runServerCertRenewal(ctx) })
	eg.Go(func() error { return g.reloadLoop(ctx) })
	if g.fw != nil {
		eg.Go(func() error { return g.fw.Run(ctx) })
	}
	if g.firmware != nil {
		eg.Go(func() error { return g.firmware.Run(ctx) })
		eg.Go(func() error { return g.runFirmwareAnnounce(ctx) })
	}
	if g.firmwareHTTPS != nil {
		eg.Go(func() error { return g.firmwareHTTPS.run(ctx) })
	}
	if g.upstream != nil {
		eg.Go(func() error { return g.upstream.Run(ctx) })
	}
	if g.pairing != nil {
		g.pairing.run(ctx, eg)
	}
	if g.metricsLn != nil {
		g.serveMetrics(ctx, eg)
	}
	g.printSummary()
	if g.opts.Ready != nil {
		g.opts.Ready(g)
	}
	notifyReady()
	g.log.Info("gateway ready", "gateway_id", g.cfg.Load().GatewayID, "dev", g.opts.Dev)
	err := eg.Wait()
	g.log.Info("gateway stopped")
	return err
}

func (g *Gateway) close() {
	if g.restoreMemLimit != nil {
		g.restoreMemLimit()
		g.restoreMemLimit = nil
	}
	if g.metricsLn != nil {
		g.metricsLn.Close() // New failed, or Run's server closed it already
	}
	if g.pairing != nil {
		g.pairing.close()
	}
	if g.queue != nil {
		g.queue.Close()
	}
	if g.parking != nil {
		g.parking.Close()
	}
	if g.firmware != nil {
		g.firmware.Close()
	}
	if g.store != nil {
		g.store.Close()
		g.store = nil
	}
}

func (g *Gateway) reloadLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-g.opts.Reload:
			if !ok {
				<-ctx.Done()
				return nil
			}
			g.Reload()
		}
	}
}

// Reload re-reads the configuration file. A bad file is refused with the
// reason and the running configuration stays. A reload is applied whole or
// not at all: every check that can refuse it (the file, the firewall
// policy, the vendor roots, the upstream link's settings and credentials)
// runs before anything is applied, so a refusal leaves nothing
// half-applied (the firewall's new policy in force beside the old upstream
// settings and log level, say).
//
// Only the keys liveConfig takes from the file are applied; the others
// keep their running values in the configuration the reload stores and
// builds the firewall policy from (a listener that moves at the next
// restart keeps its port open until then), and the log and the audit name
// those that changed.
func (g *Gateway) Reload() error {
	g.reloadMu.Lock()
	defer g.reloadMu.Unlock()
	old := g.cfg.Load()
	var base config.Config
	if g.opts.Dev {
		base = config.Dev(old.StateDir)
	} else {
		base = config.Production()
	}
	refuse := func(msg string, err error) error {
		g.metrics.reloads.WithLabelValues("refused").Inc()
		g.log.Error(msg, "file", g.configPath, "err", err)
		g.store.Audit(store.Event{Time: g.clock.Now(), Actor: "system", Action: "config.reload_refused", Target: g.configPath, Detail: err.Error()})
		return err
	}
	file, warnings, err := config.LoadWithWarnings(g.configPath, base)
	if err != nil {
		return refuse("config reload refused; the running configuration stays", err)
	}
	g.logConfigWarnings(warnings)
	linkLive := g.upstream != nil && file.Upstream.Enabled
	cfg := liveConfig(*old, file, linkLive)
	atRestart := config.ChangedKeys(cfg, file)
	// The checks.
	var policy firewall.Policy
	if g.fw != nil {
		if policy, err = cfg.FirewallPolicy(g.pairingFirewallExtra()...); err != nil {
			return refuse("config reload refused: the new firewall policy is not valid; the running configuration stays", err)
		}
	}
	var vendors map[string]*x509.CertPool
	if g.pairing != nil {
		if vendors, err = loadVendorRoots(cfg.Pairing.Vendors, g.log); err != nil {
			return refuse("config reload refused: a vendor root file could not be used; the running configuration stays", err)
		}
	}
	var up *upstream.PreparedReload
	if linkLive {
		ucfg := cfg.Upstream.Config
		ucfg.Forward = g.forwardRules(ucfg) // the console's rules stay in force
		if up, err = g.upstream.PrepareReload(ucfg); err != nil {
			return refuse("config reload refused: the upstream link refused the new settings; the running configuration stays", err)
		}
	}
	// Then apply. Bounded: until it returns, reloadMu is held, and a
	// SIGTERM waits for the reload.
	if g.fw != nil {
		ctx, cancel := context.WithTimeout(context.Background(), firewall.ApplyTimeout)
		err := g.fw.Apply(ctx, policy)
		cancel()
		if err != nil {
			return refuse("config reload refused: the new firewall policy could not be applied; the running configuration stays", err)
		}
	}
	if up != nil {
		up.Apply()
	}
	if g.pairing != nil {
		g.pairing.setVendors(vendors)
	}
	g.level.Set(parseLevel(cfg.Log.Level))
	g.cfg.Store(&cfg)
	g.metrics.reloads.WithLabelValues("ok").Inc()
	var detail string
	if len(atRestart) > 0 {
		detail = "take effect at the next restart: " + strings.Join(atRestart, ", ")
		g.log.Warn("config reload: changed keys that "+detail+"; until then their running values stay in force", "file", g.configPath, "keys", atRestart)
	}
	g.store.Audit(store.Event{Time: g.clock.Now(), Actor: "system", Action: "config.reload", Target: g.configPath, Detail: detail})
	g.log.Info("config reloaded", "file", g.configPath)
	return nil
}

// liveConfig is the configuration a reload puts in force: from the file,
// the keys a reload applies (the log level, the device certificate
// validity, the firewall's zones, rate, ping and forwarding, the vendor
// roots of pairing, and the upstream link's settings while the link runs
// and the file keeps it on); from the running configuration, every other
// key, as what is running still uses it until the next restart.
func liveConfig(running, file config.Config, linkLive bool) config.Config {
	c := running
	c.Log.Level = file.Log.Level
	c.PKI.DeviceCertValidity = file.PKI.DeviceCertValidity
	manage := c.Firewall.Manage
	c.Firewall = file.Firewall
	c.Firewall.Manage = manage
	c.Pairing.Vendors = file.Pairing.Vendors
	if linkLive {
		c.Upstream.Config = file.Upstream.Config
		// An upstream id derived from gateway_id follows it to the next
		// restart, and so does a client id derived from that.
		if file.GatewayID != running.GatewayID && file.Upstream.Gateway == file.GatewayID {
			c.Upstream.Gateway = running.Upstream.Gateway
			if file.Upstream.ClientID == file.Upstream.Gateway {
				c.Upstream.ClientID = running.Upstream.ClientID
			}
		}
	}
	return c
}

// logConfigWarnings logs what the configuration file says that is accepted
// but likely not what was meant.
func (g *Gateway) logConfigWarnings(ws []*config.Error) {
	for _, w := range ws {
		g.log.Warn("config: "+w.Error(), "file", w.File, "line", w.Line, "key", w.Key)
	}
}

// openMetrics binds metrics.listen, if set. In New, as every listener:
// bound in Run, after the other components had started, a port in use
// made Run return while they ran on, and its deferred close shut the
// store and the queues under them.
func (g *Gateway) openMetrics(cfg config.Config) error {
	if cfg.Metrics.Listen == "" {
		return nil
	}
	ln, err := net.Listen("tcp", cfg.Metrics.Listen)
	if err != nil {
		return fmt.Errorf("metrics.listen %s: %w", cfg.Metrics.Listen, err)
	}
	g.metricsLn = ln
	return nil
}

func (g *Gateway) serveMetrics(ctx context.Context, eg *errgroup.Group) {
	srv := g.metricsServer()
	eg.Go(func() error {
		go func() { <-ctx.Done(); srv.Close() }()
		if err := srv.Serve(g.metricsLn); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
}

// metricsServer is the server of metrics.listen: plain HTTP, on loopback.
// Its ErrorLog is what the HTTPS servers' is (httpsRefusals): its lines go
// to the gateway's log, escaped, each kind at most once per 10 s. Without
// one, net/http writes them (an Accept error at every retry, a handler's
// panic) to stderr, unescaped and outside the log. Having no TLS
// handshake, it has none of the refusals that ErrorLog counts.
func (g *Gateway) metricsServer() *http.Server {
	log := g.log.With("component", "metrics")
	return &http.Server{Handler: metricsHandler(g.metrics), ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: g.newHTTPSRefusals("metrics", "metrics", log, slog.LevelWarn).errorLog()}
}

func (g *Gateway) activeDevices() float64 {
	if g.store == nil {
		return 0
	}
	ds, err := g.store.Devices()
	if err != nil {
		return 0
	}
	n := 0
	for _, d := range ds {
		if !d.Revoked {
			n++
		}
	}
	return float64(n)
}

// Addrs returns the bound address of each listener, by name.
func (g *Gateway) Addrs() map[string]string {
	m := map[string]string{}
	if g.coap != nil {
		c, p := g.coap.Addrs()
		m["coaps"] = c.String()
		if p != nil {
			m["coaps_psk"] = p.String()
		}
	}
	if g.mqtt != nil {
		m["mqtts"] = g.mqtt.Addr()
	}
	if g.console != nil {
		m["console"] = g.console.Addr().String()
	}
	if a := g.FirmwareHTTPSAddr(); a != nil {
		m["firmware_https"] = a.String()
	}
	m["control"] = g.ctl.path
	return m
}

// Deliver sends a command to a device (m.Topic = devices/{m.Device}/c/...)
// over whichever transport it is connected with: CoAP Observe or MQTT. The
// upstream downlink, the console and the gateway itself use it.
func (g *Gateway) Deliver(ctx context.Context, m bridges.Message) error { return g.hub.Deliver(ctx, m) }

// Hub returns the local message hub shared by the device transports.
func (g *Gateway) Hub() *hub.Hub { return g.hub }

// CA returns the gateway's certificate authority.
func (g *Gateway) CA() *pki.CA { return g.ca }

// Devices returns the device service.
func (g *Gateway) Devices() *Devices { return g.devices }

// Store returns the state store.
func (g *Gateway) Store() *store.Store { return g.store }

// Config returns the running configuration.
func (g *Gateway) Config() config.Config { return *g.cfg.Load() }

func (g *Gateway) printSummary() {
	a := g.Addrs()
	w := g.opts.Out
	mode := "production"
	if g.opts.Dev {
		mode = "dev (loopback, no firewall changes)"
	}
	fmt.Fprintf(w, "\nBastion %s is running — %s\n", buildinfo.Version, mode)
	fmt.Fprintf(w, "  state:    %s\n  config:   %s\n", g.cfg.Load().StateDir, g.configPath)
	if v, ok := a["coaps"]; ok {
		fmt.Fprintf(w, "  CoAPS:    coaps://%s (certificates)\n", v)
	}
	if v, ok := a["coaps_psk"]; ok {
		fmt.Fprintf(w, "  CoAPS:    coaps://%s (PSK)\n", v)
	}
	if v, ok := a["mqtts"]; ok {
		fmt.Fprintf(w, "  MQTT/TLS: mqtts://%s\n", v)
	}
	if v, ok := a["console"]; ok {
		fmt.Fprintf(w, "  console:  https://%s/\n", v)
	}
	if v, ok := a["firmware_https"]; ok {
		fmt.Fprintf(w, "  firmware: https://%s/fw/ (device certificates; CoAPS devices use /fw/ on CoAPS)\n", v)
	}
	fmt.Fprintf(w, "  CA:       %s (trust this root)\n", filepath.Join(g.cfg.Load().StateDir, "pki", "root.crt"))
	fmt.Fprintf(w, "  admin:    bastionctl --state %s status\n", g.cfg.Load().StateDir)
	if g.pairing != nil {
		g.pairing.summary(w)
	}
	if g.setupCode != "" {
		fmt.Fprintf(w, "  setup code: %s   (one-time: creates the first console admin)\n", g.setupCode)
	}
	if g.fw == nil {
		if plan, err := g.firewallPlan(context.Background()); err == nil {
			fmt.Fprintf(w, "  firewall: not managed here (firewall.manage: false); the policy would install:\n")
			for _, l := range strings.Split(strings.TrimRight(plan, "\n"), "\n") {
				fmt.Fprintf(w, "    %s\n", l)
			}
		}
	} else {
		fmt.Fprintf(w, "  firewall: applied (bastionctl firewall show)\n")
	}
	fmt.Fprintln(w)
}
