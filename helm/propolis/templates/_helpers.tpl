{{/* Names, labels and shared pieces of the Propolis chart. */}}

{{- define "propolis.labels" -}}
app.kubernetes.io/part-of: propolis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "propolis.image" -}}
{{- $img := .Values.image -}}
{{- if and $img.useDigest $img.digest -}}
{{ $img.repository }}@{{ $img.digest }}
{{- else -}}
{{ $img.repository }}:{{ $img.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/* kubeProxyReplacement as Cilium accepts it: "true"/"false" or a boolean. */}}
{{- define "propolis.kubeProxyReplacement" -}}
{{- if eq (toString .Values.kubeProxyReplacement) "true" }}true{{ else }}false{{ end }}
{{- end }}

{{- define "propolis.natsName" -}}{{ .Release.Name }}-nats{{- end }}
{{- define "propolis.natsAuthSecret" -}}{{ .Release.Name }}-nats-auth{{- end }}
{{- define "propolis.natsRelayName" -}}{{ .Release.Name }}-nats-relay{{- end }}

{{/* Where the per-node services connect with nats.relays.enabled: the relay Service's ClusterIP (the same
     environment-variable route, and the same kube-proxy caveat, as propolis.natsUrl). */}}
{{- define "propolis.natsRelayUrl" -}}
{{- $host := printf "$(%s_SERVICE_HOST)" (include "propolis.natsRelayName" . | upper | replace "-" "_") -}}
{{ if .Values.nats.tls.enabled }}tls{{ else }}nats{{ end }}://{{ $host }}:{{ .Values.nats.relays.port }}
{{- end }}

{{/* The PROPOLIS_NATS_URL of a service: per-node services use a relay when there are relays. */}}
{{- define "propolis.serviceNatsUrl" -}}
{{- if and (eq .scope "node") .root.Values.nats.relays.enabled -}}
{{ include "propolis.natsRelayUrl" .root }}
{{- else -}}
{{ include "propolis.natsUrl" .root }}
{{- end }}
{{- end }}

{{/* A server's `authorization` block: the admin and one user per service, with the permissions of `file`
     (files/nats-permissions.json, or files/nats-relay-permissions.json on a relay; helm/generate.py) and
     `passwords` (propolis.natsPasswords, computed once per render: a second call draws new ones). */}}
{{- define "propolis.natsAuthorization" -}}
{{- $passwords := .passwords -}}
{{- $perms := .root.Files.Get .file | fromJson -}}
{{- $users := list (dict "user" "admin" "password" $passwords.admin) -}}
{{- range $perms.users -}}
{{- $password := get $passwords .user | required (printf "NATS user %s (files/nats-permissions.json) has no subchart charts/%s" .user .user) -}}
{{- $users = append $users (merge (dict "password" $password) .) -}}
{{- end -}}
authorization {{ toPrettyJson (dict "users" $users) | replace "\\u003e" ">" | replace "\\u003c" "<" | replace "\\u0026" "&" }}
{{- end }}

{{/* Services reach NATS through its ClusterIP, from the service environment variables Kubernetes injects
     (no cluster DNS needed), unless nats.url names an address. Known gap (docs/architecture.md, Delivery):
     from the host's network the ClusterIP needs kube-proxy, or the datapath that is still starting with
     kubeProxyReplacement; nats.url with nats.nodeSelector avoids it (tilt/values-kind.yaml). */}}
{{- define "propolis.natsUrl" -}}
{{- if .Values.nats.url -}}
{{ .Values.nats.url }}
{{- else -}}
{{- $host := printf "$(%s_SERVICE_HOST)" (include "propolis.natsName" . | upper | replace "-" "_") -}}
{{ if .Values.nats.tls.enabled }}tls{{ else }}nats{{ end }}://{{ $host }}:4222
{{- end }}
{{- end }}

{{/* Containers that call the Kubernetes API: its address when there is no kube-proxy (k8sServiceHost). */}}
{{- define "propolis.apiServerEnv" -}}
{{- with .Values.k8sServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $.Values.k8sServicePort | quote }}
{{- end }}
{{- end }}

{{/* The NATS users' passwords: kept across upgrades (lookup), random on first install. */}}
{{- define "propolis.natsPasswords" -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "propolis.natsAuthSecret" .)) | default dict -}}
{{- $data := $existing.data | default dict -}}
{{- $out := dict -}}
{{- $users := list "admin" -}}
{{- range $sub := .Subcharts }}{{ $users = append $users $sub.Values.name }}{{ end -}}
{{- if .Values.nats.relays.enabled }}{{ $users = append $users "relay" }}{{ end -}}
{{- range $user := $users -}}
{{- $key := printf "password-%s" $user -}}
{{- $_ := set $out $user (get $data $key | b64dec | default (randAlphaNum 32)) -}}
{{- end -}}
{{ toJson $out }}
{{- end }}

{{/* Host paths a service definition's `mounts` may name. */}}
{{- define "propolis.hostMounts" -}}
bpffs: {hostPath: /sys/fs/bpf, mountPath: /sys/fs/bpf, type: DirectoryOrCreate, propagation: HostToContainer}
run: {hostPath: /var/run/propolis, mountPath: /var/run/propolis, type: DirectoryOrCreate}
lib-modules: {hostPath: /lib/modules, mountPath: /lib/modules, type: Directory, readOnly: true}
usr-src: {hostPath: /usr/src, mountPath: /usr/src, type: Directory, readOnly: true}
cgroup: {hostPath: {{ .Values.cgroup.hostRoot }}, mountPath: {{ .Values.cgroup.hostRoot }}, type: Directory, readOnly: true}
hubble-export: {hostPath: /var/run/cilium/hubble, mountPath: /var/run/cilium/hubble, type: DirectoryOrCreate}
wireguard-state: {hostPath: /var/lib/propolis/wireguard, mountPath: /var/lib/propolis/wireguard, type: DirectoryOrCreate}
cni-bin: {hostPath: /opt/cni/bin, mountPath: /host/opt/cni/bin, type: DirectoryOrCreate}
cni-conf: {hostPath: /etc/cni/net.d, mountPath: /host/etc/cni/net.d, type: DirectoryOrCreate}
{{- end }}

{{/* Features with their own service: "feature on but its service is not in this chart" goes to NOTES. */}}
{{- define "propolis.featureServices" -}}
wireguard-keymgr: {{ and .Values.encryption.enabled (eq .Values.encryption.type "wireguard") }}
clustermesh-apiserver: {{ .Values.clustermesh.useAPIServer }}
l7-proxy: {{ .Values.l7Proxy }}
dns-proxy: {{ .Values.l7Proxy }}
{{- end }}
