package gateway

// What the firmware cache shows outside itself: its refusals and freeze in
// the metrics (bastion_firmware_refusals_total, bastion_firmware_frozen),
// its images on the console's firmware page, and its alarms on the
// dashboard.

import (
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	dto "github.com/prometheus/client_model/go"

	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
)

// gatherValue is the value of the metric name with the given labels in
// g's registry, and whether it is there.
func gatherValue(t *testing.T, g *Gateway, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := g.metrics.reg.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			if !maps.Equal(labels, got) {
				continue
			}
			return metricValue(m), true
		}
	}
	return 0, false
}

func metricValue(m *dto.Metric) float64 {
	switch {
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	}
	return 0
}

func TestFirmwareRefusalsMetricsAndConsole(t *testing.T) {
	// The vendor has published nothing yet: the check the gateway makes
	// as it starts fails, and the cache has never fetched metadata.
	v := newFWVendor(t)
	g := startFirmwareGateway(t, v)
	deadline := time.Now().Add(20 * time.Second)
	for g.g.firmware.Status().Counters.CheckFailures < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the gateway's first firmware check did not fail within 20s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	d, _ := g.addFWDevice(t, "meter-a", "cert", fwClassA)
	api := newConsoleAPI(t, g.g)
	refusals := func(reason string) float64 {
		t.Helper()
		n, ok := gatherValue(t, g.g, "bastion_firmware_refusals_total", map[string]string{"reason": reason})
		if !ok {
			t.Fatalf("no bastion_firmware_refusals_total{reason=%q}", reason)
		}
		return n
	}
	frozen := func() float64 {
		t.Helper()
		n, ok := gatherValue(t, g.g, "bastion_firmware_frozen", nil)
		if !ok {
			t.Fatal("no bastion_firmware_frozen")
		}
		return n
	}
	dashboardAlarms := func() []string {
		t.Helper()
		var dash struct {
			Alarms []string `json:"alarms"`
		}
		if code := api.do(t, "GET", "/api/v1/status", &dash); code != http.StatusOK {
			t.Fatalf("GET /api/v1/status: %d", code)
		}
		return dash.Alarms
	}
	// Never fetched: frozen until the first check, and said so.
	if f := frozen(); f != 1 {
		t.Errorf("bastion_firmware_frozen = %v before any check, want 1", f)
	}
	if a := dashboardAlarms(); !slices.Contains(a, "firmware: no valid vendor metadata (never fetched): nothing is offered") {
		t.Errorf("dashboard alarms %q before any check: want the firmware cache's, never fetched", a)
	}
	img := tufrepo.Image(4000, 7)
	sha := v.publish(t, fwClassA, "1.1.0", 2, img)
	g.check(t)
	if f := frozen(); f != 0 {
		t.Errorf("bastion_firmware_frozen = %v after a good check, want 0", f)
	}

	// The firmware page shows the image its class is offered.
	var rep console.Report
	if code := api.do(t, "GET", "/api/v1/firmware", &rep); code != http.StatusOK {
		t.Fatalf("GET /api/v1/firmware: %d", code)
	}
	var images [][]string
	for _, s := range rep.Sections {
		if strings.HasPrefix(s.Title, "Images offered") {
			images = s.Table
		}
		if s.Alarm != "" {
			t.Errorf("section %q has alarm %q after a good check", s.Title, s.Alarm)
		}
	}
	want := [][]string{{fwClassA.String(), "1.1.0", "2", strconv.Itoa(len(img)), sha}}
	if diff := cmp.Diff(want, images); diff != "" {
		t.Errorf("firmware page's images (-want +got):\n%s\nreport: %+v", diff, rep)
	}

	// A status report refused over MQTT is counted (the MQTT transport
	// takes the report before it acknowledges it).
	ctx := ctxT(t, 30*time.Second)
	mq, err := d.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	before := refusals("status_refused")
	if _, err := mq.Publish(ctx, statusTopic(d.ID), 1, []byte(`{"state":"rebooting"}`)); err != nil {
		t.Fatalf("MQTT status report: %v", err)
	}
	mq.Close()
	if got := refusals("status_refused") - before; got != 1 {
		t.Errorf("status_refused went up by %v after a bad MQTT status report, want 1", got)
	}

	// Two targets of one class claiming one sequence: the class is refused,
	// counted, and the alarm reaches the dashboard.
	checkFailed, targetRefused := refusals("check_failed"), refusals("target_refused")
	v.publish(t, fwClassA, "1.2.0", 2, tufrepo.Image(4000, 8))
	if _, err := g.ctl.Do(ctxT(t, 30*time.Second), "POST", "/v1/firmware/check", nil, nil); err == nil || !strings.Contains(err.Error(), "ambiguous") {
		t.Fatalf("check of an ambiguous class: %v, want it refused", err)
	}
	if got := refusals("check_failed") - checkFailed; got != 1 {
		t.Errorf("check_failed went up by %v, want 1", got)
	}
	if got := refusals("target_refused") - targetRefused; got != 1 {
		t.Errorf("target_refused went up by %v, want 1", got)
	}
	alarms := dashboardAlarms()
	if !slices.ContainsFunc(alarms, func(a string) bool { return strings.HasPrefix(a, "firmware: ") && strings.Contains(a, "ambiguous") }) {
		t.Errorf("dashboard alarms %q: want the firmware cache's refusal", alarms)
	}
}
