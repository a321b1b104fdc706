package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

type usageError string

func (u usageError) Error() string { return string(u) }

type cli struct {
	ctl interface {
		Do(ctx context.Context, method, path string, in, out any) ([]byte, error)
	}
	json bool
	out  io.Writer
}

func (c *cli) dispatch(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return usageError("no command")
	}
	switch {
	case args[0] == "status":
		return c.status(ctx)
	case args[0] == "metrics":
		raw, err := c.ctl.Do(ctx, "GET", "/metrics", nil, nil)
		if err == nil {
			c.out.Write(raw)
		}
		return err
	case args[0] == "pki" && len(args) == 2 && args[1] == "show":
		return c.pkiShow(ctx)
	case args[0] == "firmware" && len(args) == 2 && (args[1] == "status" || args[1] == "check"):
		method, path := "GET", "/v1/firmware"
		if args[1] == "check" {
			method, path = "POST", "/v1/firmware/check"
		}
		raw, err := c.ctl.Do(ctx, method, path, nil, nil)
		if err == nil {
			c.out.Write(raw) // JSON either way: the status is structured data
		}
		return err
	case args[0] == "console" && len(args) == 2 && args[1] == "recover":
		var r struct {
			Code      string `json:"code"`
			ExpiresIn string `json:"expires_in"`
		}
		raw, err := c.ctl.Do(ctx, "POST", "/v1/console/recover", nil, &r)
		if err != nil || c.json {
			if err == nil {
				return c.printJSON(raw)
			}
			return err
		}
		fmt.Fprintf(c.out, "recovery code: %s (valid %s, once): enter it on the console's recovery page to set a new admin password\n", r.Code, r.ExpiresIn)
		return nil
	case args[0] == "upstream" && len(args) >= 2 && args[1] == "parked":
		verb := "list"
		if len(args) == 3 {
			verb = args[2]
		}
		if len(args) > 3 {
			return usageError("upstream parked takes list, retry or drop")
		}
		return c.parked(ctx, verb)
	case args[0] == "firewall" && len(args) == 2:
		return c.firewall(ctx, args[1])
	case args[0] == "pairing" && len(args) >= 2 && args[1] == "expect":
		return c.pairingExpect(ctx, args[2:])
	case args[0] == "device" && len(args) >= 2:
		switch args[1] {
		case "list":
			return c.deviceList(ctx)
		case "add":
			return c.deviceAdd(ctx, args[2:])
		case "revoke":
			if len(args) != 3 {
				return usageError("device revoke needs exactly one ID")
			}
			return c.deviceRevoke(ctx, args[2])
		}
	}
	return usageError(fmt.Sprintf("unknown command %q", strings.Join(args, " ")))
}

func (c *cli) printJSON(raw []byte) error {
	_, err := c.out.Write(raw)
	return err
}

func (c *cli) status(ctx context.Context) error {
	var st struct {
		Version           string                     `json:"version"`
		GatewayID         string                     `json:"gateway_id"`
		Mode              string                     `json:"mode"`
		Uptime            string                     `json:"uptime"`
		ClockSane         bool                       `json:"clock_sane"`
		Listeners         map[string]string          `json:"listeners"`
		Devices           int                        `json:"devices"`
		RevokedDevices    int                        `json:"revoked_devices"`
		AdminSetupPending bool                       `json:"admin_setup_pending"`
		Components        map[string]json.RawMessage `json:"components"`
	}
	raw, err := c.ctl.Do(ctx, "GET", "/v1/status", nil, &st)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	fmt.Fprintf(c.out, "gateway %s (%s, %s mode), up %s\n", st.GatewayID, st.Version, st.Mode, st.Uptime)
	if !st.ClockSane {
		fmt.Fprintln(c.out, "CLOCK NOT SET: certificates are neither accepted nor issued")
	}
	names := make([]string, 0, len(st.Listeners))
	for n := range st.Listeners {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(c.out, "  %-10s %s\n", n, st.Listeners[n])
	}
	fmt.Fprintf(c.out, "devices: %d active, %d revoked\n", st.Devices, st.RevokedDevices)
	if st.AdminSetupPending {
		fmt.Fprintln(c.out, "console: no admin yet; use the setup code bastiond printed at start")
	}
	comps := make([]string, 0, len(st.Components))
	for n := range st.Components {
		comps = append(comps, n)
	}
	sort.Strings(comps)
	for _, n := range comps {
		fmt.Fprintf(c.out, "%s: %s\n", n, st.Components[n])
	}
	return nil
}

func (c *cli) deviceList(ctx context.Context) error {
	var ds []struct {
		ID       string    `json:"id"`
		Name     string    `json:"name"`
		Auth     string    `json:"auth"`
		Created  time.Time `json:"created"`
		LastSeen time.Time `json:"last_seen"`
		Revoked  bool      `json:"revoked"`
	}
	raw, err := c.ctl.Do(ctx, "GET", "/v1/devices", nil, &ds)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	tw := tabwriter.NewWriter(c.out, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tAUTH\tCREATED\tSTATE")
	for _, d := range ds {
		st := "active"
		if d.Revoked {
			st = "revoked"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.ID, d.Name, d.Auth, d.Created.Format(time.DateTime), st)
	}
	return tw.Flush()
}

func (c *cli) deviceAdd(ctx context.Context, args []string) error {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return usageError("device add needs a NAME first")
	}
	name := args[0]
	fs := flag.NewFlagSet("device add", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	auth := fs.String("auth", "", "psk, cert or secret")
	csrFile := fs.String("csr", "", "PEM CSR file (with --auth cert)")
	vendor := fs.String("vendor", "", "vendor")
	model := fs.String("model", "", "model")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError(err.Error())
	}
	if fs.NArg() > 0 {
		return usageError(fmt.Sprintf("unexpected %q", fs.Args()))
	}
	req := map[string]string{"name": name, "auth": *auth, "vendor": *vendor, "model": *model}
	switch *auth {
	case "cert":
		if *csrFile == "" {
			return usageError("--auth cert needs --csr FILE")
		}
		b, err := os.ReadFile(*csrFile)
		if err != nil {
			return err
		}
		req["csr"] = string(b)
	case "psk", "secret":
	default:
		return usageError("--auth must be psk, cert or secret")
	}
	var cr struct {
		ID, Name, Auth, PSKIdentity, PSK, CertPEM, CAPEM, Secret string
		CoAPSPort                                                int
	}
	raw, err := c.ctl.Do(ctx, "POST", "/v1/devices", req, &cr)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	var m map[string]any
	json.Unmarshal(raw, &m)
	fmt.Fprintf(c.out, "device %s added as %s (%s)\n", m["name"], m["id"], m["auth"])
	for _, k := range []string{"psk_identity", "psk", "psk_text", "coaps_port", "secret"} {
		if v, ok := m[k]; ok {
			fmt.Fprintf(c.out, "  %-13s %v\n", k+":", v)
		}
	}
	if v, ok := m["cert_pem"]; ok {
		fmt.Fprintf(c.out, "%s", v)
	}
	fmt.Fprintln(c.out, "These credentials are shown once; store them on the device now.")
	return nil
}

func (c *cli) deviceRevoke(ctx context.Context, id string) error {
	raw, err := c.ctl.Do(ctx, "POST", "/v1/devices/"+id+"/revoke", nil, nil)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	fmt.Fprintf(c.out, "device %s revoked; its sessions are closed and its credentials refused\n", id)
	return nil
}

func (c *cli) pkiShow(ctx context.Context) error {
	var info struct {
		Root, Issuer struct {
			Subject, SHA256 string
			NotAfter        time.Time `json:"not_after"`
		}
		Servers map[string]struct {
			Serial   string
			NotAfter time.Time `json:"not_after"`
			SANs     []string
		}
		DeviceCerts  int `json:"device_certs"`
		RevokedCerts int `json:"revoked_certs"`
	}
	raw, err := c.ctl.Do(ctx, "GET", "/v1/pki", nil, &info)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	fmt.Fprintf(c.out, "root:   %s  sha256 %s  until %s\n", info.Root.Subject, info.Root.SHA256, info.Root.NotAfter.Format(time.DateOnly))
	fmt.Fprintf(c.out, "issuer: %s  until %s\n", info.Issuer.Subject, info.Issuer.NotAfter.Format(time.DateOnly))
	names := make([]string, 0, len(info.Servers))
	for n := range info.Servers {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		s := info.Servers[n]
		fmt.Fprintf(c.out, "server %-8s until %s  %s\n", n, s.NotAfter.Format(time.DateTime), strings.Join(s.SANs, ", "))
	}
	fmt.Fprintf(c.out, "device certificates: %d issued, %d revoked\n", info.DeviceCerts, info.RevokedCerts)
	return nil
}

func (c *cli) firewall(ctx context.Context, verb string) error {
	var path, method, field = "/v1/firewall/" + verb, "GET", ""
	switch verb {
	case "plan":
		field = "plan"
	case "show":
		field = "rules"
	case "remove":
		method = "POST"
	default:
		return usageError("firewall takes plan, show or remove")
	}
	var reply map[string]any
	raw, err := c.ctl.Do(ctx, method, path, nil, &reply)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	if field == "" {
		fmt.Fprintln(c.out, "Bastion's firewall rules removed: the box is unfiltered until bastiond applies the policy again")
		return nil
	}
	if verb == "plan" && reply["managed"] == false {
		fmt.Fprintln(c.out, "# bastiond does not manage the firewall (firewall.manage: false); this is what the policy would install")
	}
	fmt.Fprint(c.out, reply[field])
	return nil
}

// parked lists, retries or drops the messages the upstream broker refused
// for good (bridges/upstream's parking queue).
func (c *cli) parked(ctx context.Context, verb string) error {
	if verb == "retry" || verb == "drop" {
		var r struct {
			Count int `json:"count"`
		}
		raw, err := c.ctl.Do(ctx, "POST", "/v1/upstream/parked/"+verb, nil, &r)
		if err != nil || c.json {
			if err == nil {
				return c.printJSON(raw)
			}
			return err
		}
		if verb == "retry" {
			fmt.Fprintf(c.out, "%d parked messages moved back to the end of the upstream queue\n", r.Count)
		} else {
			fmt.Fprintf(c.out, "%d parked messages deleted\n", r.Count)
		}
		return nil
	}
	if verb != "list" {
		return usageError("upstream parked takes list, retry or drop")
	}
	var p struct {
		Depth    int   `json:"depth"`
		Bytes    int64 `json:"bytes"`
		Messages []struct {
			Seq      uint64    `json:"seq"`
			Device   string    `json:"device"`
			Topic    string    `json:"topic"`
			Bytes    int       `json:"bytes"`
			Received time.Time `json:"received"`
			Why      string    `json:"why"`
		} `json:"messages"`
	}
	raw, err := c.ctl.Do(ctx, "GET", "/v1/upstream/parked", nil, &p)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	fmt.Fprintf(c.out, "%d messages parked (%d bytes on disk)\n", p.Depth, p.Bytes)
	if len(p.Messages) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(c.out, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tDEVICE\tTOPIC\tBYTES\tRECEIVED\tREFUSED")
	for _, m := range p.Messages {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\n", m.Seq, m.Device, m.Topic, m.Bytes, m.Received.Format(time.DateTime), m.Why)
	}
	if len(p.Messages) < p.Depth {
		fmt.Fprintf(tw, "... and %d more\n", p.Depth-len(p.Messages))
	}
	return tw.Flush()
}

// pairingExpect registers a device's setup code for the next pairing
// window. It cannot open the window: only the box's button does.
func (c *cli) pairingExpect(ctx context.Context, args []string) error {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return usageError("pairing expect needs a NAME first")
	}
	fs := flag.NewFlagSet("pairing expect", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	code := fs.String("code", "", "the setup code on the device's label")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError(err.Error())
	}
	if *code == "" || fs.NArg() > 0 {
		return usageError("pairing expect NAME --code CODE")
	}
	raw, err := c.ctl.Do(ctx, "POST", "/v1/pairing/expect", map[string]string{"name": args[0], "code": *code}, nil)
	if err != nil || c.json {
		if err == nil {
			return c.printJSON(raw)
		}
		return err
	}
	fmt.Fprintf(c.out, "device %s expected: press the gateway's pairing button (1-10 s), then start the device's pairing\n", args[0])
	return nil
}
