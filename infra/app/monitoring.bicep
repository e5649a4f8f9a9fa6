// Log Analytics + Application Insights with local (instrumentation key) authentication disabled:
// the host sends telemetry with the function's managed identity
// (APPLICATIONINSIGHTS_AUTHENTICATION_STRING), which needs Monitoring Metrics Publisher here.
// Only stdout/stderr of the custom handler reach the host's logs, and lakeguard never logs a key,
// SAS or token (README: Security).

param logAnalyticsName string
param applicationInsightsName string
param location string
param tags object = {}

@description('Principal that publishes telemetry (the function\'s user-assigned identity).')
param publisherPrincipalId string

@description('Days Log Analytics keeps the logs.')
param retentionInDays int = 30

var roles = loadJsonContent('../roles.json')

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: applicationInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
  }
}

resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, publisherPrincipalId, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: publisherPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output applicationInsightsName string = appInsights.name
output connectionString string = appInsights.properties.ConnectionString
