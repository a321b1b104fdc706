package gateway

// Device update status across a restart, end to end: devices report over
// CoAPS and MQTT/TLS, the gateway stops and starts again on the same state
// directory, and the control API (what `bastionctl firmware status` shows)
// and the console's JSON API still show the reports; the console's export
// carries them and its erase deletes them.

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// consoleAPI calls the console's JSON API over HTTPS with an API token of
// an admin made in the store (what an integrator's script does).
type consoleAPI struct {
	base, token string
	hc          *http.Client
}

func newConsoleAPI(t *testing.T, g *Gateway) *consoleAPI {
	t.Helper()
	tok := "fwstatus-test-token-0123456789"
	sum := sha256.Sum256([]byte(tok))
	st := g.Store()
	if _, err := st.Admin("root"); errors.Is(err, store.ErrNotFound) {
		if err := st.AddAdmin(store.AdminUser{Name: "root", Role: console.RoleAdmin, Created: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.PutAPIToken(store.APIToken{Hash: hex.EncodeToString(sum[:]), ID: "t1", User: "root", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.CA().RootPool(), ServerName: "127.0.0.1"}}}
	t.Cleanup(hc.CloseIdleConnections)
	return &consoleAPI{base: "https://" + g.Addrs()["console"], token: tok, hc: hc}
}

func (c *consoleAPI) do(t *testing.T, method, path string, out any) int {
	t.Helper()
	req, _ := http.NewRequest(method, c.base+path, nil)
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %v in %s", method, path, err, b)
		}
	}
	return resp.StatusCode
}

// statusRows is the console's firmware report's device table, by device.
func (c *consoleAPI) statusRows(t *testing.T) map[string][]string {
	t.Helper()
	var rep console.Report
	if code := c.do(t, "GET", "/api/v1/firmware", &rep); code != http.StatusOK {
		t.Fatalf("GET /api/v1/firmware: %d", code)
	}
	out := map[string][]string{}
	for _, s := range rep.Sections {
		if strings.HasPrefix(s.Title, "Device update status") {
			for _, row := range s.Table {
				out[row[0]] = row[1:]
			}
		}
	}
	return out
}

func TestFirmwareStatusSurvivesRestart(t *testing.T) {
	v := newFWVendor(t)
	img := tufrepo.Image(3000, 1)
	sha := v.publish(t, fwClassA, "1.1.0", 1, img)
	dir := filepath.Join(t.TempDir(), "state")
	g := startFirmwareGatewayIn(t, v, dir)
	pa, _ := g.addFWDevice(t, "thermo-a", "psk", fwClassA)
	ma, _ := g.addFWDevice(t, "meter-a", "cert", fwClassA)
	g.check(t)
	ctx := ctxT(t, 60*time.Second)

	// pa reports over CoAPS, ma over MQTT/TLS (devices/{id}/s/fw, QoS 1:
	// the report is stored before the PUBACK).
	fc, err := pa.DialFirmwareCoAP(ctx, g.g.Addrs()["coaps_psk"])
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	if err := otacache.ReportStatusCoAP(ctx, fc.Conn(), devicesim.StatusPath, otacache.DeviceStatus{State: otacache.StateFailed, Version: "1.1.0", SHA256: sha, Detail: "verification failed"}); err != nil {
		t.Fatal(err)
	}
	mq, err := ma.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	report, _ := json.Marshal(otacache.DeviceStatus{State: otacache.StateInstalled, Version: "1.1.0", SHA256: sha})
	if rc, err := mq.Publish(ctx, statusTopic(ma.ID), 1, report); err != nil || rc >= 0x80 {
		t.Fatalf("MQTT status report: rc %#x %v", rc, err)
	}
	mq.Close()
	before := g.statuses(t)
	want := map[string]otacache.DeviceStatus{
		pa.ID: {State: otacache.StateFailed, Version: "1.1.0", SHA256: sha, Detail: "verification failed"},
		ma.ID: {State: otacache.StateInstalled, Version: "1.1.0", SHA256: sha},
	}
	if d := cmp.Diff(want, withoutAt(before)); d != "" {
		t.Fatalf("statuses before the restart (-want +got):\n%s", d)
	}
	fc.Close()
	g.stop()

	// Restart on the same state directory.
	g = startFirmwareGatewayIn(t, v, dir)
	if d := cmp.Diff(before, g.statuses(t)); d != "" {
		t.Errorf("/v1/firmware (bastionctl firmware status) after the restart (-want +got):\n%s", d)
	}
	api := newConsoleAPI(t, g.g)
	rows := api.statusRows(t)
	wantRows := map[string][]string{
		pa.ID: {"failed", "1.1.0", sha, "verification failed", before[pa.ID].At.UTC().Format(time.RFC3339)},
		ma.ID: {"installed", "1.1.0", sha, "", before[ma.ID].At.UTC().Format(time.RFC3339)},
	}
	if d := cmp.Diff(wantRows, rows); d != "" {
		t.Errorf("console firmware report after the restart (-want +got):\n%s", d)
	}
	// ma's "installed 1.1.0" still counts: 1.1.0 is not offered to it again.
	if o, ok := g.g.Firmware().Offer(ma.ID); ok {
		t.Errorf("after the restart ma (installed 1.1.0) was offered %+v", o)
	}
	if _, ok := g.g.Firmware().Offer(pa.ID); !ok {
		t.Error("after the restart pa (failed) is offered nothing")
	}

	// Export carries the status; erase deletes it everywhere.
	var ex struct {
		FirmwareStatus *otacache.DeviceStatus `json:"firmware_status"`
	}
	if code := api.do(t, "GET", "/api/v1/devices/"+pa.ID+"/export", &ex); code != http.StatusOK {
		t.Fatalf("export: %d", code)
	}
	if ex.FirmwareStatus == nil || !ex.FirmwareStatus.At.Equal(before[pa.ID].At) || ex.FirmwareStatus.State != otacache.StateFailed {
		t.Errorf("export firmware_status = %+v, want %+v", ex.FirmwareStatus, before[pa.ID])
	}
	if code := api.do(t, "DELETE", "/api/v1/devices/"+pa.ID+"/data", nil); code != http.StatusNoContent {
		t.Fatalf("erase: %d", code)
	}
	if _, ok := g.statuses(t)[pa.ID]; ok {
		t.Error("erased device's status still shown by /v1/firmware")
	}
	if _, ok := api.statusRows(t)[pa.ID]; ok {
		t.Error("erased device's status still shown by the console")
	}
	if _, err := g.g.Store().FirmwareStatus(pa.ID); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("erased device's status still in the store: %v", err)
	}
	ex.FirmwareStatus = nil
	if code := api.do(t, "GET", "/api/v1/devices/"+pa.ID+"/export", &ex); code != http.StatusOK || ex.FirmwareStatus != nil {
		t.Errorf("export after erase: %d, firmware_status %+v; want 200 and none", code, ex.FirmwareStatus)
	}
	if _, ok := g.statuses(t)[ma.ID]; !ok {
		t.Error("erasing pa took ma's status too")
	}
}

func withoutAt(m map[string]otacache.DeviceStatus) map[string]otacache.DeviceStatus {
	out := map[string]otacache.DeviceStatus{}
	for k, v := range m {
		v.At = time.Time{}
		out[k] = v
	}
	return out
}
